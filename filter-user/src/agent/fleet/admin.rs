//! `ewsgate fleet push FILE` and `ewsgate fleet status`: the CLI speaks to etcd itself, with
//! the `[fleet]` settings of `--config`, so it works while the local agent is down.

use std::{path::Path, time::Duration};

use super::{
    session::{connect, list, FleetError},
    unix_ms,
};
use crate::{
    config::{load_bundle, ConfigError},
    model::fleet::{FleetSettings, GateReport, Keys, Revision},
};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Refused(String),
    #[error("etcd: {0}")]
    Fleet(#[from] FleetError),
}

/// Reads and checks `file` (it must validate here first, as every gate checks it again),
/// and stores it as the fleet's next config revision; returns the revision.
pub async fn push(s: &FleetSettings, file: &Path) -> Result<i64, AdminError> {
    let (config, bundle) = load_bundle(file)?;
    let table: toml::Table = toml::from_str(&bundle.text)
        .map_err(|e| AdminError::Refused(format!("{}: {e}", file.display())))?;
    for per_gate in ["xdp", "fleet"] {
        if table.contains_key(per_gate) {
            return Err(AdminError::Refused(format!(
                "{}: [{per_gate}] is each gate's own; leave it out of a fleet config",
                file.display()
            )));
        }
    }
    drop(config);
    let revision = Revision {
        text: bundle.text,
        path: bundle.path,
        files: bundle.files.into_iter().collect(),
        pushed_ms: unix_ms(),
    };
    let value = serde_json::to_vec(&revision)
        .map_err(|e| AdminError::Refused(format!("encoding the revision: {e}")))?;
    let keys = Keys::new(&s.prefix);
    let (mut client, _) = connect(s, 0).await?;
    let put = tokio::time::timeout(s.timeout, client.put(keys.config(), value, None))
        .await
        .map_err(|_| FleetError::Timeout("storing the revision"))?
        .map_err(|source| FleetError::Etcd {
            what: "storing the revision",
            source,
        })?;
    Ok(put.header().map_or(0, |h| h.revision()))
}

/// Every gate's report, by name.
pub async fn reports(s: &FleetSettings) -> Result<Vec<(String, GateReport)>, AdminError> {
    let keys = Keys::new(&s.prefix);
    let (mut client, _) = connect(s, 0).await?;
    let (kvs, _) = list(&mut client, &keys.gates(), s.timeout).await?;
    Ok(kvs
        .into_iter()
        .filter_map(|(k, v, _)| {
            let name = k.strip_prefix(&keys.gates())?.to_string();
            Some((name, serde_json::from_slice(&v).ok()?))
        })
        .collect())
}

/// The revision stored under `<prefix>/config`, if any.
pub async fn current(s: &FleetSettings) -> Result<Option<i64>, AdminError> {
    let keys = Keys::new(&s.prefix);
    let (mut client, _) = connect(s, 0).await?;
    let got = tokio::time::timeout(s.timeout, client.get(keys.config(), None))
        .await
        .map_err(|_| FleetError::Timeout("reading the revision"))?
        .map_err(|source| FleetError::Etcd {
            what: "reading the revision",
            source,
        })?;
    Ok(got.kvs().first().map(|kv| kv.mod_revision()))
}

/// `fleet status` as text: one line per gate.
pub fn render(current: Option<i64>, reports: &[(String, GateReport)]) -> String {
    let now = unix_ms();
    let mut out = format!(
        "config revision {}\n{:<16} {:<10} {:<12} {:>7} {:>7}  {}\n",
        current.map_or("none".into(), |r| r.to_string()),
        "gate",
        "revision",
        "contact",
        "blocks",
        "allows",
        "notes"
    );
    for (name, r) in reports {
        let ago = Duration::from_millis(now.saturating_sub(r.contact_ms)).as_secs();
        let mut notes = Vec::new();
        if let Some((rev, why)) = &r.refused {
            if r.revision.is_none_or(|run| run < *rev) {
                notes.push(format!("refused revision {rev}: {why}"));
            }
        }
        if let Some((from, to)) = r.last_partition {
            notes.push(format!(
                "last partitioned {} s, {} s ago",
                to.saturating_sub(from) / 1000,
                now.saturating_sub(to) / 1000
            ));
        }
        out.push_str(&format!(
            "{:<16} {:<10} {:<12} {:>7} {:>7}  {}\n",
            name,
            r.revision.map_or("-".into(), |r| r.to_string()),
            format!("{ago}s ago"),
            r.blocks,
            r.allows,
            notes.join("; ")
        ));
    }
    out
}

/// The `[fleet]` of the config at `path`.
fn settings(path: &Path) -> Result<FleetSettings, AdminError> {
    let config = crate::model::Config::load(path)?;
    config
        .fleet
        .ok_or_else(|| AdminError::Refused(format!("{}: no [fleet] section", path.display())))
}

fn block_on<T>(
    fut: impl std::future::Future<Output = Result<T, AdminError>>,
) -> Result<T, AdminError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AdminError::Refused(format!("starting a runtime: {e}")))?
        .block_on(fut)
}

/// `ewsgate fleet push FILE`: stores the revision and says which it is.
pub fn push_command(config: &Path, file: &Path) -> Result<String, AdminError> {
    let s = settings(config)?;
    let rev = block_on(push(&s, file))?;
    Ok(format!(
        "stored as fleet config revision {rev}; each gate checks it and reports in `ewsgate fleet status`"
    ))
}

/// `ewsgate fleet status [--json]`.
pub fn status_command(config: &Path, json: bool) -> Result<String, AdminError> {
    let s = settings(config)?;
    let (current, reports) = block_on(async { Ok((current(&s).await?, reports(&s).await?)) })?;
    if json {
        let v = serde_json::json!({ "revision": current, "gates": reports.iter().map(|(n, r)| serde_json::json!({"gate": n, "report": r})).collect::<Vec<_>>() });
        return Ok(v.to_string());
    }
    Ok(render(current, &reports))
}
