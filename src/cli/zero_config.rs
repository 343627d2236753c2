//! `demo` and `protect`: a gateway from no config file, with credentials made up for
//! the run.

use std::net::SocketAddr;
use std::process::ExitCode;

use super::{builtin, serve};
use crate::server::RunFlags;

pub(super) fn demo(listen: SocketAddr, admin: SocketAddr) -> ExitCode {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        runtime.block_on(async move {
            match crate::demo_upstream::DemoUpstream::start("127.0.0.1:0").await {
                Ok(up) => {
                    let _ = tx.send(Ok(up.addr));
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
    });
    let upstream = match rx.recv() {
        Ok(Ok(addr)) => addr,
        Ok(Err(e)) => {
            eprintln!("error: cannot start the demo app: {e}");
            return ExitCode::from(2);
        }
        Err(_) => {
            eprintln!("error: the demo app thread stopped");
            return ExitCode::from(2);
        }
    };
    let credentials = match Credentials::mint() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let yaml = format!(
        "
listeners: [{{ address: '{listen}' }}]
admin: {{ address: '{admin}' }}
upstreams:
  demo:
    backends: ['{upstream}']
    health_check: {{ kind: http, path: /health, interval: 5s }}
plugins:
  pin:
    type: pin_gate
    pin_hash: '{pin_hash}'
    secret: '{secret}'
  stamp:
    type: headers
    request: {{ set: {{ X-Gatewarden-User: '{{identity.subject}}', X-Gatewarden-Client: '{{client_ip}}' }} }}
    response: {{ set: {{ X-Frame-Options: DENY }} }}
routes:
  - name: demo
    access: user
    upstream: demo
    plugins: [pin, stamp]
",
        pin_hash = credentials.pin_hash,
        secret = credentials.secret,
    );
    let compiled = match builtin(&yaml) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "gatewarden demo: open http://{listen}/ and sign in with PIN {} (demo app on {upstream})",
        credentials.pin
    );
    serve(compiled, None, RunFlags::default())
}

pub(super) fn protect(url: &str, listen: SocketAddr) -> ExitCode {
    let Some((tls, rest)) = url
        .strip_prefix("http://")
        .map(|r| (false, r))
        .or_else(|| url.strip_prefix("https://").map(|r| (true, r)))
    else {
        eprintln!("error: {url:?} must start with http:// or https://");
        return ExitCode::from(2);
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        eprintln!("error: {url:?} needs a host (and no user info)");
        return ExitCode::from(2);
    }
    let backend = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    // On loopback only this machine can reach the app, as it already could. Anywhere
    // else, nothing passes without the minted token or PIN.
    let exposed = !listen.ip().is_loopback();
    let credentials = if exposed {
        match Credentials::mint() {
            Ok(c) => Some(c),
            Err(code) => return code,
        }
    } else {
        None
    };
    let tls_line = if tls { "tls: true" } else { "tls: false" };
    let (plugins, access, chain) = match &credentials {
        Some(c) => (
            format!(
                "plugins:\n  token: {{ type: api_key, admin_key: '{}' }}\n  pin: {{ type: pin_gate, pin_hash: '{}', secret: '{}' }}\n",
                c.token, c.pin_hash, c.secret
            ),
            "user",
            "[token, pin]",
        ),
        None => (String::new(), "public", "[]"),
    };
    let yaml = format!(
        "
listeners: [{{ address: '{listen}' }}]
upstreams:
  app:
    backends: ['{backend}']
    {tls_line}
{plugins}routes:
  - name: app
    access: {access}
    upstream: app
    plugins: {chain}
"
    );
    let compiled = match builtin(&yaml) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match &credentials {
        Some(c) => {
            println!("gatewarden: protecting {url} at http://{listen}/");
            println!("  API clients: Authorization: Bearer {}", c.token);
            println!("  browsers:    sign in with PIN {}", c.pin);
            println!("  these are shown once and not stored anywhere");
        }
        None => {
            println!("gatewarden: protecting {url} at http://{listen}/ (loopback only, no login)")
        }
    }
    serve(compiled, None, RunFlags::default())
}

/// A random access token, PIN and session secret for the zero-config commands.
struct Credentials {
    token: String,
    pin: String,
    pin_hash: String,
    secret: String,
}

impl Credentials {
    fn mint() -> Result<Credentials, ExitCode> {
        use gatewarden_plugins::keys;
        // Eight digits from base62 noise: keep only digits until there are enough.
        let mut pin = String::new();
        while pin.len() < 8 {
            pin.extend(keys::random_base62(32).chars().filter(char::is_ascii_digit));
        }
        pin.truncate(8);
        let pin_hash = gatewarden_plugins::pin_gate::hash_pin(&pin).map_err(|e| {
            eprintln!("error: cannot hash the PIN: {e}");
            ExitCode::from(2)
        })?;
        Ok(Credentials {
            token: keys::generate_key(),
            pin,
            pin_hash,
            secret: keys::random_base62(48),
        })
    }
}
