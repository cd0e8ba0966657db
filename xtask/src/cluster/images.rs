//! Copies the local images from the host engine into every node (`docker save | docker load`):
//! there is no registry for the nodes to pull from.
//!
//! Loading is the slow part of `cluster up`, so nodes load in parallel, and a node skips an
//! image it already has with the same id.
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use super::{plan::Node, swarm};
use crate::{cmd, images};

/// What the nodes need: the agent, and what tests and the demo run on them.
pub fn wanted() -> [&'static str; 4] {
    [images::AGENT, images::BACKEND, images::NGINX, images::CURL]
}

/// Loads into every node the images it lacks or holds in another version. Returns whether some
/// node received a new agent image (its running agent is then out of date).
pub fn load_into(nodes: &[Node]) -> anyhow::Result<bool> {
    let mut host_ids = Vec::new();
    for image in wanted() {
        let id = image_id(None, image).with_context(|| {
            format!("the host engine has no {image}; `cargo xtask setup` and `cargo xtask image` build it")
        })?;
        host_ids.push((image, id));
    }
    let results: Vec<anyhow::Result<bool>> = std::thread::scope(|scope| {
        let workers: Vec<_> = nodes
            .iter()
            .map(|node| scope.spawn(|| load_missing(node, &host_ids)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("image loading thread panicked"))
            .collect()
    });
    let mut agent_changed = false;
    for result in results {
        agent_changed |= result?;
    }
    Ok(agent_changed)
}

fn load_missing(node: &Node, host_ids: &[(&str, String)]) -> anyhow::Result<bool> {
    let missing: Vec<&str> = host_ids
        .iter()
        .filter(|(image, id)| image_id(Some(node), image).ok().as_ref() != Some(id))
        .map(|(image, _)| *image)
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    println!(
        "cluster: loading {} into {}",
        missing.join(" "),
        node.name()
    );
    let mut save = Command::new(cmd::docker())
        .arg("save")
        .args(&missing)
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start docker save")?;
    let load = Command::new(cmd::docker())
        .args(["-H", &node.docker_host(), "load", "-q"])
        .stdin(save.stdout.take().context("docker save has no stdout")?)
        .stdout(Stdio::null())
        .status()
        .context("could not start docker load")?;
    let saved = save.wait()?;
    if !saved.success() || !load.success() {
        bail!(
            "copying {} into {} failed (save: {saved}, load: {load})",
            missing.join(" "),
            node.name()
        );
    }
    Ok(missing.contains(&images::AGENT))
}

/// The image's id on the host engine (`None`) or on a node.
fn image_id(node: Option<&Node>, image: &str) -> anyhow::Result<String> {
    let args = ["image", "inspect", "-f", "{{.Id}}", image];
    match node {
        Some(node) => swarm::docker(node, &args),
        None => cmd::output(cmd::docker(), &args),
    }
}
