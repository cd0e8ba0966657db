//! The admin API's operator endpoints: overrides (drain, weight, maintenance, clear) and `why`.
//!
//! - `POST /api/containers/<c>/drain`, `POST .../undrain` (or `DELETE .../drain`)
//! - `PUT .../weight` with `{"weight": N}` (or a bare `N`), `DELETE .../weight`
//! - `POST .../maintenance`, `DELETE .../maintenance` (or `PUT` with `{"maintenance": bool}`)
//! - `GET .../why`
//! - `GET /api/overrides`, `DELETE /api/overrides/<name>`, `DELETE /api/overrides?stale`
//!
//! `<c>` is a container name, full id or unique id prefix; overrides are kept by name.
use std::time::Duration;

use serde_json::{Value, json};

use super::{AdminRequest, AdminState, Reply, query_param};
use crate::registry::{Control, ControlMessage, Message, overrides::Change};

pub(super) async fn handle(request: &AdminRequest, state: &AdminState) -> Reply {
    let method = request.method.as_str();
    let parts: Vec<&str> = request.path.trim_end_matches('/').split('/').collect();
    let control = match (method, parts.as_slice()) {
        ("GET", ["", "api", "overrides"]) => Control::List,
        ("DELETE", ["", "api", "overrides"]) if query_param(&request.query, "stale").is_some() => {
            Control::ClearStale
        }
        ("DELETE", ["", "api", "overrides", name]) => match valid_name(name) {
            Ok(name) => Control::Clear {
                names: vec![name.to_owned()],
            },
            Err(reply) => return reply,
        },
        (_, ["", "api", "containers", container, action]) => {
            let container = match valid_name(container) {
                Ok(c) => c.to_owned(),
                Err(reply) => return reply,
            };
            if (method, *action) == ("GET", "why") {
                return why(container, state).await;
            }
            match change(method, action, &request.body) {
                Ok(change) => Control::Change { container, change },
                Err(reply) => return reply,
            }
        }
        _ => {
            return Reply::error(
                404,
                "not found; see /api/containers/<name>/drain|undrain|weight|maintenance|why and \
                 /api/overrides",
            );
        }
    };
    match ask(state, control).await {
        Ok(Ok(value)) => Reply::json(200, value.to_string()),
        Ok(Err(e)) => Reply::json(e.status, json!(e).to_string()),
        Err(reply) => reply,
    }
}

/// Names and ids as Docker spells them; anything else is refused before it reaches a file.
fn valid_name(name: &str) -> Result<&str, Reply> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err(Reply::error(
            400,
            "a container is named by its name (letters, digits, _ . -) or its id",
        ))
    }
}

fn change(method: &str, action: &str, body: &[u8]) -> Result<Change, Reply> {
    Ok(match (method, action) {
        ("POST", "drain") => Change::Drain,
        ("POST", "undrain") | ("DELETE", "drain") => Change::Undrain,
        ("POST", "maintenance") => Change::Maintenance(true),
        ("DELETE", "maintenance") => Change::Maintenance(false),
        ("PUT", "maintenance") => match parse_body(body)?.get("maintenance") {
            Some(Value::Bool(on)) => Change::Maintenance(*on),
            _ => return Err(Reply::error(400, r#"send {"maintenance": true|false}"#)),
        },
        ("PUT" | "POST", "weight") => {
            let value = parse_body(body)?;
            let weight = value.get("weight").unwrap_or(&value);
            match weight {
                Value::Null => Change::Weight(None),
                w => match w.as_u64().and_then(|w| u32::try_from(w).ok()) {
                    Some(w) => Change::Weight(Some(w)),
                    None => {
                        return Err(Reply::error(
                            400,
                            r#"send {"weight": N} with N from 0 to 100, or {"weight": null} for the label's"#,
                        ));
                    }
                },
            }
        }
        ("DELETE", "weight") => Change::Weight(None),
        (_, "drain" | "undrain" | "maintenance" | "weight" | "why") => {
            return Err(Reply::error(
                405,
                "use POST .../drain, POST .../undrain, PUT .../weight, POST or DELETE \
                 .../maintenance, GET .../why",
            ));
        }
        _ => {
            return Err(Reply::error(
                404,
                "unknown action; use drain, undrain, weight, maintenance or why",
            ));
        }
    })
}

fn parse_body(body: &[u8]) -> Result<Value, Reply> {
    serde_json::from_slice(body).map_err(|e| Reply::error(400, &format!("body is not JSON: {e}")))
}

async fn ask(state: &AdminState, request: Control) -> Result<crate::registry::ControlReply, Reply> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let stopping = || Reply::error(503, "the registry did not answer; the agent is stopping");
    state
        .proxy
        .registry
        .send(Message::Control(ControlMessage { request, reply }))
        .map_err(|_| stopping())?;
    tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .map_err(|_| stopping())?
        .map_err(|_| stopping())
}

/// `why`: the registry explains the containers it knows; for others, the Docker engine says
/// whether the container exists, runs, and carries the router's labels.
async fn why(container: String, state: &AdminState) -> Reply {
    match ask(
        state,
        Control::Why {
            container: container.clone(),
        },
    )
    .await
    {
        Ok(Ok(value)) => Reply::json(200, value.to_string()),
        Ok(Err(e)) if e.status == 404 => Reply::json(200, unknown_why(&container, state).await),
        Ok(Err(e)) => Reply::json(e.status, json!(e).to_string()),
        Err(reply) => reply,
    }
}

async fn unknown_why(container: &str, state: &AdminState) -> String {
    let not_routed = |reasons: Vec<String>| {
        json!({ "container": container, "routed": false, "reasons": reasons, "notes": [] })
            .to_string()
    };
    let Some(docker) = state.docker.load_full() else {
        return not_routed(vec![format!(
            "the agent does not know {container:?} and is not connected to the Docker engine"
        )]);
    };
    let details = match docker.inspect_container(container, None).await {
        Ok(details) => details,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {
            return not_routed(vec![format!(
                "no container {container:?} on this host's Docker engine (in a cluster, ask the \
                 agent of the node it runs on)"
            )]);
        }
        Err(e) => return not_routed(vec![format!("the Docker engine did not answer: {e}")]),
    };
    let name = details
        .name
        .as_deref()
        .unwrap_or(container)
        .trim_start_matches('/');
    let labels = details.config.and_then(|c| c.labels).unwrap_or_default();
    let running = details
        .state
        .as_ref()
        .and_then(|s| s.running)
        .unwrap_or(false);
    let mut reasons = Vec::new();
    if !crate::labels::is_router_container(&labels) {
        reasons.push(format!(
            "{name} has no router labels (aliyun.routing.port_<port>=<domain>, aliyun.probe.*): \
             the agent ignores it"
        ));
    }
    if !running {
        let status = details
            .state
            .and_then(|s| s.status)
            .map_or_else(|| "unknown".to_owned(), |s| s.to_string());
        reasons.push(format!("{name} is not running (status: {status})"));
    }
    if reasons.is_empty() {
        reasons.push(format!(
            "{name} runs with router labels but the agent has not taken it in yet; retry in a \
             moment, then check the agent's log"
        ));
    }
    json!({ "container": name, "id": details.id, "routed": false, "reasons": reasons, "notes": [] })
        .to_string()
}
