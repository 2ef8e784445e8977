//! Where the CLI finds its client certificate when `--certs` is not given.
//!
//! `treaty demo` and `docker/cluster.sh up` register the certificates
//! directory of the cluster they start under each of its endpoints, in
//! `~/.treaty/clusters/` (or `$TREATY_HOME/clusters/`): one file per
//! endpoint (`127.0.0.1_7001`) holding the directory's absolute path. The
//! CLI looks its endpoints up there, so `treaty put k v` works against a
//! local demo or compose cluster without flags. The order is: `--certs` /
//! `TREATY_CERTS`, `--insecure`, then this registry.

use std::path::{Path, PathBuf};

use treaty_common::tls::{Identity, Security, DEFAULT_CLIENT};

fn registry() -> Option<PathBuf> {
    let base = match std::env::var_os("TREATY_HOME") {
        Some(h) => PathBuf::from(h),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".treaty"),
    };
    Some(base.join("clusters"))
}

fn entry_name(endpoint: &str) -> String {
    endpoint.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
}

/// Records `certs` as the credentials for `endpoints` (best effort: a
/// registry that cannot be written only means flags are needed).
pub fn register(endpoints: &[String], certs: &Path) {
    let Some(dir) = registry() else { return };
    let Ok(certs) = certs.canonicalize() else { return };
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    for e in endpoints {
        let _ = std::fs::write(dir.join(entry_name(e)), certs.display().to_string());
    }
}

/// Removes the entries of `endpoints` that still point at `certs`.
pub fn unregister(endpoints: &[String], certs: &Path) {
    let (Some(dir), Ok(certs)) = (registry(), certs.canonicalize()) else { return };
    for e in endpoints {
        let path = dir.join(entry_name(e));
        if std::fs::read_to_string(&path).is_ok_and(|p| Path::new(p.trim()) == certs) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The registered certificates directory of the first endpoint that has one.
pub fn lookup(endpoints: &[String]) -> Option<(PathBuf, PathBuf)> {
    let dir = registry()?;
    endpoints.iter().find_map(|e| {
        let entry = dir.join(entry_name(e));
        let certs = PathBuf::from(std::fs::read_to_string(&entry).ok()?.trim());
        certs.is_dir().then_some((certs, entry))
    })
}

/// The security the CLI connects to `endpoints` with (see the module docs).
pub fn client_security(certs: Option<&Path>, insecure: bool, endpoints: &[String]) -> Result<Security, String> {
    let me = || Identity::Client(DEFAULT_CLIENT.into());
    if insecure {
        return Ok(Security::Insecure);
    }
    if let Some(dir) = certs {
        return Security::tls(dir, me()).map_err(|e| e.to_string());
    }
    if let Some((dir, entry)) = lookup(endpoints) {
        return Security::tls(&dir, me()).map_err(|e| format!("{e} (found through {})", entry.display()));
    }
    Err(format!(
        "no client credentials for {}: pass --certs DIR (TREATY_CERTS), the directory `treaty certs create` made \
         (`treaty demo` uses <data-dir>/certs, `docker/cluster.sh up` docker/certs/<project>); or --insecure for a \
         cluster started with --insecure",
        endpoints.join(",")
    ))
}
