//! `router-agent ctl`: operators' commands against a running agent's admin API (drain,
//! weight, maintenance, why, status), with human-readable output.
//!
//! A blocking HTTP/1.1 exchange per command (one request, `Connection: close`, read to the
//! end): the admin API answers small JSON bodies, so no HTTP client crate is needed.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use serde_json::{Value, json};

use crate::{admin::auth::TOKEN_FILE, config::DEFAULT_STATE_DIR};

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct CtlArgs {
    /// The agent's admin API.
    #[arg(
        long,
        env = "ROUTER_ADMIN",
        default_value = "127.0.0.1:9090",
        global = true
    )]
    pub admin: SocketAddr,
    /// The admin token's file [default: `<state-dir>/admin.token`].
    #[arg(long, env = "ROUTER_ADMIN_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// The agent's state directory, where its generated token is.
    #[arg(long, env = "ROUTER_STATE_DIR", default_value = DEFAULT_STATE_DIR, global = true)]
    pub state_dir: PathBuf,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(clap::Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlCommand {
    /// Routes, their backends (state, weight, requests) and the overrides.
    Status,
    /// No new requests to these containers; in-flight ones and sticky sessions finish.
    Drain {
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Undo `drain`.
    Undrain {
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Set the weight (0-100; 0 = no new traffic), or `label` to use the label's again.
    Weight { container: String, weight: String },
    /// Take a container out of rotation whatever its probes say (`on`), or back (`off`).
    Maintenance {
        container: String,
        #[arg(value_parser = ["on", "off"])]
        mode: String,
    },
    /// Remove every override of these container names (running or not), or with `--stale`
    /// those of containers that are not running.
    Clear {
        names: Vec<String>,
        #[arg(long, conflicts_with = "names")]
        stale: bool,
    },
    /// Why a container is or is not routed.
    Why { container: String },
}

pub fn run(args: &CtlArgs) -> ExitCode {
    match execute(args) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("router-agent ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn execute(args: &CtlArgs) -> Result<String, String> {
    let api = Api::new(args);
    let mut out = String::new();
    match &args.command {
        CtlCommand::Status => {
            let routes = api.call("GET", "/api/routes", None)?;
            let overrides = api.call("GET", "/api/overrides", None)?;
            if args.json {
                return Ok(format!(
                    "{}\n",
                    json!({"routes": routes["routes"], "overrides": overrides["overrides"]})
                ));
            }
            out = status_text(&routes, &overrides);
        }
        CtlCommand::Drain { containers } | CtlCommand::Undrain { containers } => {
            let action = if matches!(args.command, CtlCommand::Drain { .. }) {
                "drain"
            } else {
                "undrain"
            };
            for c in containers {
                let v = api.call("POST", &format!("/api/containers/{c}/{action}"), None)?;
                out += &changed_line(&v, args.json);
            }
        }
        CtlCommand::Weight { container, weight } => {
            let body = match weight.as_str() {
                "label" => json!({ "weight": null }),
                n => {
                    json!({ "weight": n.parse::<u32>().map_err(|_| format!("weight {n:?}: give 0 to 100, or `label`"))? })
                }
            };
            let v = api.call(
                "PUT",
                &format!("/api/containers/{container}/weight"),
                Some(&body),
            )?;
            out = changed_line(&v, args.json);
        }
        CtlCommand::Maintenance { container, mode } => {
            let method = if mode == "on" { "POST" } else { "DELETE" };
            let v = api.call(
                method,
                &format!("/api/containers/{container}/maintenance"),
                None,
            )?;
            out = changed_line(&v, args.json);
        }
        CtlCommand::Clear { names, stale } => {
            let mut cleared = Vec::new();
            if *stale {
                let v = api.call("DELETE", "/api/overrides?stale", None)?;
                cleared.extend(names_of(&v["cleared"]));
            } else if names.is_empty() {
                return Err("name the containers whose overrides to clear, or give --stale".into());
            } else {
                for name in names {
                    let v = api.call("DELETE", &format!("/api/overrides/{name}"), None)?;
                    cleared.extend(names_of(&v["cleared"]));
                }
            }
            out = if args.json {
                format!("{}\n", json!({ "cleared": cleared }))
            } else if cleared.is_empty() {
                "no override to clear\n".into()
            } else {
                format!("cleared the overrides of {}\n", cleared.join(", "))
            };
        }
        CtlCommand::Why { container } => {
            let v = api.call("GET", &format!("/api/containers/{container}/why"), None)?;
            out = if args.json {
                format!("{v}\n")
            } else {
                why_text(&v)
            };
        }
    }
    Ok(out)
}

fn names_of(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

struct Api<'a> {
    args: &'a CtlArgs,
    token_file: PathBuf,
    /// The token, or why it could not be read (said only if the agent asks for one).
    token: Result<String, String>,
}

impl<'a> Api<'a> {
    fn new(args: &'a CtlArgs) -> Self {
        let token_file = args
            .token_file
            .clone()
            .unwrap_or_else(|| args.state_dir.join(TOKEN_FILE));
        let token = std::fs::read_to_string(&token_file)
            .map(|t| t.trim().to_owned())
            .map_err(|e| format!("cannot read the admin token {}: {e}", token_file.display()));
        Self {
            args,
            token_file,
            token,
        }
    }

    /// One request; the JSON answer, or an error that says what went wrong and what to do.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let addr = self.args.admin;
        let unreachable = |e: std::io::Error| {
            format!(
                "cannot reach the agent's admin API at {addr}: {e}; is router-agent running? \
                 (--admin ADDR or ROUTER_ADMIN names another address)"
            )
        };
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(unreachable)?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).map_err(unreachable)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).map_err(unreachable)?;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut head = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = head.parse(&response) else {
            return Err(format!("{addr} answered something that is not HTTP"));
        };
        let status = head.code.unwrap_or_default();
        let value: Value = serde_json::from_slice(&response[head_len..]).unwrap_or(Value::Null);
        match status {
            200 => Ok(value),
            401 => Err(match &self.token {
                Err(e) => format!(
                    "the agent at {addr} wants a token and {e}; run as the agent's user (root) \
                     or pass --token-file"
                ),
                Ok(_) => format!(
                    "the agent at {addr} refused the token in {}: {}",
                    self.token_file.display(),
                    value["error"].as_str().unwrap_or("unauthorized")
                ),
            }),
            status => Err(format!(
                "{method} {path}: {status}: {}",
                value["error"].as_str().unwrap_or("(no message)")
            )),
        }
    }
}

/// What an override object of the API sets, in words: `drained`, `maintenance`, `weight N`.
fn override_words(o: &Value) -> Vec<String> {
    let mut set = Vec::new();
    if o["drained"] == true {
        set.push("drained".to_owned());
    }
    if o["maintenance"] == true {
        set.push("maintenance".to_owned());
    }
    if let Some(w) = o["weight"].as_u64() {
        set.push(format!("weight {w}"));
    }
    set
}

fn changed_line(v: &Value, json: bool) -> String {
    if json {
        return format!("{v}\n");
    }
    let set = override_words(&v["override"]);
    let overrides = if set.is_empty() {
        "none".to_owned()
    } else {
        set.join(", ")
    };
    format!(
        "{}: state {}, weight {}; overrides: {overrides}\n",
        v["container"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        v["weight"]
            .as_u64()
            .map_or_else(|| "-".into(), |w| w.to_string()),
    )
}

fn status_text(routes: &Value, overrides: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let routes = routes["routes"].as_array().cloned().unwrap_or_default();
    if routes.is_empty() {
        out += "no routes\n";
    }
    for r in &routes {
        let target = match r["listen_port"].as_u64() {
            Some(port) => format!("tcp://{}:{port}", r["domain"].as_str().unwrap_or("")),
            None => format!(
                "{}://{}{}",
                r["scheme"].as_str().unwrap_or("http"),
                r["domain"].as_str().unwrap_or(""),
                r["path"].as_str().unwrap_or("/")
            ),
        };
        let mut flags = Vec::new();
        if r["internal"] == true {
            flags.push("internal");
        }
        if r["sticky"] == true {
            flags.push("sticky");
        }
        let _ = writeln!(out, "{target}  [{}]", flags.join(", "));
        let _ = writeln!(
            out,
            "  {:<32} {:<12} {:>6} {:>8} {:>10}  ADDRESS",
            "CONTAINER", "STATE", "WEIGHT", "ACTIVE", "REQUESTS"
        );
        for b in r["backends"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {:<32} {:<12} {:>6} {:>8} {:>10}  {}",
                b["container_name"].as_str().unwrap_or(""),
                b["state"].as_str().unwrap_or(""),
                b["weight"].to_string(),
                b["active_connections"].to_string(),
                b["requests"].to_string(),
                b["address"].as_str().unwrap_or("")
            );
        }
    }
    let overrides = overrides["overrides"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !overrides.is_empty() {
        out += "\noverrides (kept by container name):\n";
        for o in &overrides {
            let set = override_words(&o["override"]);
            let stale = if o["stale"] == true {
                "  (stale: not running here; `ctl clear` removes it)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {:<32} {}{stale}",
                o["container"].as_str().unwrap_or(""),
                set.join(", ")
            );
        }
    }
    out
}

fn why_text(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let name = v["container"].as_str().unwrap_or("?");
    let id = v["id"].as_str().map(|id| &id[..id.len().min(12)]);
    let head = match id {
        Some(id) => format!("{name} ({id})"),
        None => name.to_owned(),
    };
    if v["routed"] == true {
        let _ = writeln!(
            out,
            "{head}: routed (state {}, weight {})",
            v["state"].as_str().unwrap_or("?"),
            v["weight"]
        );
    } else {
        let _ = writeln!(out, "{head}: NOT routed");
        for r in v["reasons"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "  - {}", r.as_str().unwrap_or(""));
        }
    }
    for r in v["routes"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  route: {}://{}{} -> port {}",
            r["scheme"].as_str().unwrap_or("http"),
            r["domain"].as_str().unwrap_or(""),
            r["path"].as_str().unwrap_or(""),
            r["container_port"]
        );
    }
    for n in v["notes"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  note: {}", n.as_str().unwrap_or(""));
    }
    out
}
