//! `walrelay ha` (the agent of one node) and `walrelay ctl` (look at and steer a cluster).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::ha::{CtlConfig, HaConfig};
use crate::ha::agent::{Agent, SharedStatus};
use crate::ha::api;
use crate::ha::store::{ClusterView, Store};

pub async fn ha(config: HaConfig) -> anyhow::Result<ExitCode> {
    let cancel = super::run::cancel_on_signal()?;
    let config = Arc::new(config);
    let status = SharedStatus::default();
    let api_store = Store::new(&config.cluster).await?;
    let addr = config.node.api.parse().expect("validated at load");
    let tls = api::tls_config(&config.api).map_err(anyhow::Error::msg)?;
    let api = api::serve(
        addr,
        tls,
        config.api.token.clone(),
        status.clone(),
        Arc::new(api_store),
        cancel.clone(),
    )
    .await
    .with_context(|| format!("the REST API cannot listen on {addr}"))?;
    tracing::info!(member = %config.node.name, api = %addr, "HA agent started");
    let agent = Agent::new(config, status).await?;
    let result = agent.run(cancel.clone()).await;
    cancel.cancel();
    let _ = api.await;
    result?;
    Ok(ExitCode::SUCCESS)
}

/// `walrelay ha-fence`: started by the agent, never by hand (see `ha::fence`).
pub async fn fence(data_dir: std::path::PathBuf) -> anyhow::Result<ExitCode> {
    crate::ha::fence::run(data_dir).await?;
    Ok(ExitCode::SUCCESS)
}

async fn read(config: &CtlConfig) -> anyhow::Result<(Store, ClusterView)> {
    let store = Store::new(&config.cluster).await?;
    let view = store
        .read()
        .await
        .context("reading the cluster from etcd")?;
    Ok((store, view))
}

/// `ctl list`: one line per member; for a replica, whether it could be promoted now and
/// how its copies of the primary's logical slots stand.
pub async fn list(config: &CtlConfig) -> anyhow::Result<ExitCode> {
    let (_, view) = read(config).await?;
    print!("{}", render_list(&view, &config.cluster.name));
    Ok(ExitCode::SUCCESS)
}

pub fn render_list(view: &ClusterView, cluster: &str) -> String {
    let leader = view.leader.as_ref().map(|l| l.holder.as_str());
    let leader_at = view.leader_position();
    let mut rows = vec![[
        "Member",
        "Host",
        "Role",
        "State",
        "TL",
        "Lag MB",
        "Promotable",
        "Logical slots",
    ]
    .map(String::from)];
    for m in &view.members {
        let role = if Some(m.name.as_str()) == leader {
            "leader".to_string()
        } else {
            m.role.clone()
        };
        let lag = match leader_at {
            Some(at) if Some(m.name.as_str()) != leader => {
                format!(
                    "{:.1}",
                    at.bytes_since(m.received) as f64 / (1 << 20) as f64
                )
            }
            _ => String::new(),
        };
        let promotable = if Some(m.name.as_str()) == leader {
            String::new()
        } else {
            match &m.not_promotable {
                None => "yes".into(),
                Some(why) => format!("no: {why}"),
            }
        };
        let slots = if Some(m.name.as_str()) == leader {
            view.slots
                .as_ref()
                .filter(|s| s.leader == m.name)
                .map(|s| {
                    let names: Vec<&str> = s.slots.iter().map(|s| s.name.as_str()).collect();
                    names.join(", ")
                })
                .unwrap_or_default()
        } else {
            let copies: Vec<String> = m
                .slot_copies
                .iter()
                .map(|c| match (&c.note, c.ready) {
                    (_, true) => format!("{} ready", c.name),
                    (Some(why), false) => format!("{} not ready: {why}", c.name),
                    (None, false) => format!("{} not ready", c.name),
                })
                .collect();
            copies.join("; ")
        };
        rows.push([
            m.name.clone(),
            format!("{}:{}", m.host, m.port),
            role,
            m.state.clone(),
            m.timeline.to_string(),
            lag,
            promotable,
            slots,
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = format!(
        "Cluster {cluster}, leader {} (generation {})\n",
        leader.unwrap_or("none"),
        view.leader.as_ref().map_or(0, |l| l.generation)
    );
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `ctl switchover`: ask the leader's REST API (with `api.token`), then wait until another
/// member leads on a fresh lease.
pub async fn switchover(config: &CtlConfig, candidate: Option<String>) -> anyhow::Result<ExitCode> {
    let (store, view) = read(config).await?;
    if let Err(why) = api::validate_switchover(&view, None, candidate.as_deref()) {
        anyhow::bail!("switchover refused: {why}");
    }
    let old = view.leader.clone().expect("validated: a leader exists");
    if config.api.token.is_none() {
        anyhow::bail!(
            "api.token is not set: the leader's REST API takes a switchover only with it"
        );
    }
    let leader = view
        .member(&old.holder)
        .with_context(|| format!("the leader {} has no member key in etcd", old.holder))?;
    let request = serde_json::to_string(&api::SwitchoverRequest {
        leader: Some(old.holder.clone()),
        candidate: candidate.clone(),
    })
    .expect("serialises");
    let answer = crate::ha::client::post(
        &leader.api,
        leader.api_tls,
        &config.api,
        "/switchover",
        &request,
    )
    .await?;
    if answer.status != 202 {
        anyhow::bail!(
            "the leader's REST API refused the switchover ({}): {}",
            answer.status,
            answer.body.trim()
        );
    }
    let asked = Instant::now();
    println!(
        "switchover from {} to {} requested",
        old.holder,
        candidate.as_deref().unwrap_or("the best replica")
    );
    let timeout = 4 * config.cluster.ttl + Duration::from_secs(60);
    while asked.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(view) = store.read().await else {
            continue;
        };
        if let Some(new) = view.leader.as_ref().filter(|l| l.holder != old.holder) {
            let primary = view
                .member(&new.holder)
                .is_some_and(|m| m.role == "primary");
            if primary {
                println!(
                    "{} leads now (generation {}), after {:.1} s",
                    new.holder,
                    new.generation,
                    asked.elapsed().as_secs_f64()
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
        if view.switchover.is_none() && view.leader.as_ref() == Some(&old) {
            anyhow::bail!("the switchover was cancelled: no replica could take over");
        }
    }
    anyhow::bail!("no new leader after {timeout:?}; `walrelay ctl list` shows where things stand")
}
