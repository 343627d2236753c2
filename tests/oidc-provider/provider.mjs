// A real OpenID provider for gatewarden's integration tests: the certified
// `oidc-provider` package, on 127.0.0.1 only, with one confidential client.
//
//   PORT=4000 REDIRECT_URIS=http://127.0.0.1:8080/.gatewarden/oidc/callback \
//   KEY_DIR=/tmp/keys node provider.mjs
//
// Environment:
//   PORT            port to listen on (or the first argument)
//   REDIRECT_URIS   comma-separated redirect URIs of the client
//   POST_LOGOUT_URIS comma-separated post-logout redirect URIs (optional)
//   KEY_DIR         where the signing keys live: keys.json (private JWKs, newest first)
//                   and the newest key as signing.pem (PKCS#8), signing.pub.pem and
//                   signing.kid, so tests can forge tokens with the provider's own key
//   ROTATE=1        make a new signing key at start and publish it before the old ones
//   AUTH_METHOD     client_secret_basic (default) or client_secret_post: the only
//                   method the client may use and the provider advertises
//
// No developer interactions: GET /interaction/:uid shows a plain login form that
// POSTs `login` and `password` to /interaction/:uid/login (`abort=1` there refuses the
// login with access_denied, as a user pressing "cancel"); consent is granted at once.
// Users: any login with the password `password`; `alice` is in the group
// `gateway-admins`. Client credentials with `resource=urn:gatewarden:api` mint JWT
// access tokens for the `jwt` plugin.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.env.PORT || process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('provider.mjs: give a port in PORT or as the first argument');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;
const list = (name) => (process.env[name] || '').split(',').filter(Boolean);
const API = 'urn:gatewarden:api';
const PASSWORD = 'password';
const GROUPS = { alice: ['gateway-admins', 'staff'], bob: ['staff'] };

function loadKeys() {
  const dir = process.env.KEY_DIR;
  if (!dir) {
    console.error('provider.mjs: set KEY_DIR');
    process.exit(2);
  }
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'keys.json');
  let keys = fs.existsSync(file) ? JSON.parse(fs.readFileSync(file, 'utf8')) : [];
  if (keys.length === 0 || process.env.ROTATE === '1') {
    const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const jwk = privateKey.export({ format: 'jwk' });
    jwk.kid = `k${Date.now().toString(36)}${randomBytes(3).toString('hex')}`;
    jwk.alg = 'RS256';
    jwk.use = 'sig';
    keys = [jwk, ...keys];
    fs.writeFileSync(file, JSON.stringify(keys));
    fs.writeFileSync(
      path.join(dir, 'signing.pem'),
      privateKey.export({ format: 'pem', type: 'pkcs8' }),
    );
    fs.writeFileSync(path.join(dir, 'signing.kid'), jwk.kid);
    fs.writeFileSync(
      path.join(dir, 'signing.pub.pem'),
      publicKey.export({ format: 'pem', type: 'spki' }),
    );
  }
  return keys;
}

const authMethod = process.env.AUTH_METHOD || 'client_secret_basic';

const configuration = {
  clientAuthMethods: [authMethod],
  clients: [
    {
      client_id: 'gatewarden',
      client_secret: 'test-client-secret-0123456789',
      redirect_uris: list('REDIRECT_URIS'),
      post_logout_redirect_uris: list('POST_LOGOUT_URIS'),
      grant_types: ['authorization_code', 'client_credentials'],
      response_types: ['code'],
      token_endpoint_auth_method: authMethod,
    },
  ],
  jwks: { keys: loadKeys() },
  cookies: { keys: ['test-provider-cookie-key'] },
  claims: { openid: ['sub'], email: ['email'], groups: ['groups'] },
  // Scope claims go into the ID token itself, as Authentik and Keycloak do.
  conformIdTokenClaims: false,
  async findAccount(_ctx, id) {
    return {
      accountId: id,
      async claims() {
        return { sub: id, email: `${id}@example.test`, groups: GROUPS[id] || [] };
      },
    };
  },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    rpInitiatedLogout: { enabled: true },
    resourceIndicators: {
      enabled: true,
      async getResourceServerInfo(_ctx, resource) {
        if (resource !== API) throw new errors.InvalidTarget();
        return {
          scope: 'api',
          audience: API,
          accessTokenFormat: 'jwt',
          accessTokenTTL: 300,
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  pkce: { required: () => true },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  ttl: {
    AccessToken: 300,
    AuthorizationCode: 60,
    ClientCredentials: 300,
    Grant: 600,
    IdToken: 300,
    Interaction: 600,
    Session: 600,
  },
};

const provider = new Provider(issuer, configuration);

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function loginPage(uid, message) {
  return `<!doctype html><title>Test provider login</title>
<p>${escape(message || 'Sign in')}</p>
<form method="post" action="/interaction/${escape(uid)}/login">
<input name="login"><input name="password" type="password"><button>Sign in</button>
</form>`;
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 16384) break;
  }
  return new URLSearchParams(body);
}

provider.use(async (ctx, next) => {
  const m = ctx.path.match(/^\/interaction\/([\w-]+)(\/login)?$/);
  if (!m) return next();
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const { prompt, params, session } = details;
  ctx.set('cache-control', 'no-store');
  if (prompt.name === 'login') {
    if (ctx.method === 'POST' && m[2]) {
      const form = await readForm(ctx.req);
      if (form.get('abort') === '1') {
        const to = await provider.interactionResult(ctx.req, ctx.res, {
          error: 'access_denied',
          error_description: 'End-User aborted interaction',
        });
        ctx.status = 303;
        ctx.redirect(to);
        return undefined;
      }
      const login = form.get('login') || '';
      if (!/^[a-z]{1,32}$/.test(login) || form.get('password') !== PASSWORD) {
        ctx.status = 401;
        ctx.type = 'html';
        ctx.body = loginPage(details.uid, 'Wrong login or password');
        return undefined;
      }
      const to = await provider.interactionResult(
        ctx.req,
        ctx.res,
        { login: { accountId: login } },
        { mergeWithLastSubmission: false },
      );
      ctx.status = 303;
      ctx.redirect(to);
      return undefined;
    }
    ctx.type = 'html';
    ctx.body = loginPage(details.uid);
    return undefined;
  }
  if (prompt.name === 'consent') {
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const missing = prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [resource, scopes] of Object.entries(missing.missingResourceScopes || {})) {
      grant.addResourceScope(resource, scopes.join(' '));
    }
    const grantId = await grant.save();
    const to = await provider.interactionResult(
      ctx.req,
      ctx.res,
      { consent: { grantId } },
      { mergeWithLastSubmission: true },
    );
    ctx.status = 303;
    ctx.redirect(to);
    return undefined;
  }
  ctx.status = 400;
  ctx.body = `unexpected prompt ${prompt.name}`;
  return undefined;
});

provider.on('server_error', (_ctx, err) => console.error('server_error', err));

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc provider listening on ${issuer}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
