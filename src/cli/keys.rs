//! `key new|list|revoke` and `hash-pin`.

use std::process::ExitCode;

use super::KeyAction;
use crate::config;

pub(super) fn key(action: KeyAction) -> ExitCode {
    use gatewarden_plugins::key_store::RedisKeys;
    use gatewarden_plugins::keys::{KeysFile, NewKey};
    use gatewarden_plugins::Role;
    let result: Result<(), String> = match action {
        KeyAction::New {
            store,
            name,
            role,
            subject,
            expires,
        } => (|| {
            let role = Role::parse(&role)
                .ok_or_else(|| format!("unknown role {role:?}; use user or admin"))?;
            let expires_at = match expires {
                Some(text) => {
                    let d = config::units::parse_duration(&text)?;
                    let d = chrono::Duration::from_std(d)
                        .map_err(|_| format!("{text:?} is too long"))?;
                    Some(chrono::Utc::now() + d)
                }
                None => None,
            };
            if name.trim().is_empty() {
                return Err("--name must not be empty".into());
            }
            let (record, plaintext) = store
                .open()?
                .create(NewKey {
                    name,
                    role,
                    subject,
                    expires_at,
                })
                .map_err(|e| e.to_string())?;
            eprintln!(
                "created key {} ({}, role {}, subject {}){}; it is shown once, store it now:",
                record.id,
                record.prefix,
                record.role.as_str(),
                record.subject,
                record
                    .expires_at
                    .map(|e| format!(", expires {}", e.to_rfc3339()))
                    .unwrap_or_default()
            );
            println!("{plaintext}");
            Ok(())
        })(),
        KeyAction::List { store } => store
            .open()
            .and_then(|s| s.list().map_err(|e| e.to_string()))
            .map(|(f, used)| {
                let now = chrono::Utc::now();
                let fmt = |t: Option<chrono::DateTime<chrono::Utc>>| {
                    t.map_or("-".to_string(), |t| t.format("%Y-%m-%d %H:%M").to_string())
                };
                println!(
                    "{:<11} {:<16} {:<10} {:<6} {:<16} {:<16} {:<16} {:<16} STATUS",
                    "ID", "NAME", "PREFIX", "ROLE", "SUBJECT", "CREATED", "EXPIRES", "LAST USED"
                );
                for k in &f.keys {
                    println!(
                        "{:<11} {:<16} {:<10} {:<6} {:<16} {:<16} {:<16} {:<16} {}",
                        k.id,
                        k.name,
                        k.prefix,
                        k.role.as_str(),
                        k.subject,
                        fmt(Some(k.created_at)),
                        fmt(k.expires_at),
                        fmt(used.get(&k.id).copied()),
                        k.status(now)
                    );
                }
            }),
        KeyAction::Revoke { store, key } => store
            .open()
            .and_then(|s| s.revoke(&key).map_err(|e| e.to_string()))
            .map(|k| {
                println!("revoked {} ({}, {})", k.id, k.prefix, k.name);
            }),
        KeyAction::Import { file, redis } => (|| {
            if !file.exists() {
                return Err(format!("{} does not exist", file.display()));
            }
            let keys = KeysFile::load(&file).map_err(|e| e.to_string())?;
            let added = RedisKeys::open(&redis)?
                .import(&keys)
                .map_err(|e| e.to_string())?;
            println!(
                "imported {added} of {} keys from {} ({} were there already)",
                keys.keys.len(),
                file.display(),
                keys.keys.len() - added
            );
            Ok(())
        })(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

pub(super) fn hash_pin() -> ExitCode {
    let mut pin = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut pin) {
        eprintln!("error: cannot read the PIN from stdin: {e}");
        return ExitCode::from(1);
    }
    let pin = pin.trim_end_matches(['\r', '\n']);
    match gatewarden_plugins::pin_gate::hash_pin(pin) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
