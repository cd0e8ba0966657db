//! Operator overrides per container: drain, weight, maintenance, set through the admin API
//! (`router-agent ctl`), applied when the routing table is built, and kept in a state file so
//! that they survive agent restarts.
//!
//! Overrides are keyed by container **name**, not id: a name is what survives `docker restart`,
//! a compose `up` that recreates the container, or a blue/green redeploy of one colour, and it is
//! what acsrouting users set weights on. An override whose container is not running stays (it
//! applies again when a container of that name comes back) and is listed as stale until
//! `ctl clear` removes it.
use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{health::BackendState, labels::MAX_WEIGHT};

/// The state file's name inside `--state-dir`.
pub const STATE_FILE: &str = "overrides.json";

/// What the operator set on one container.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct Override {
    /// No new requests; in-flight ones finish, sticky sessions may still finish.
    pub drained: bool,
    /// Out of rotation whatever its probes say; shown as `maintenance`.
    pub maintenance: bool,
    /// Replaces the `aliyun.routing.weight` label (0: no new traffic).
    pub weight: Option<u32>,
    /// When it was last changed (Unix milliseconds).
    pub updated_unix_ms: u64,
}

impl Override {
    pub fn is_empty(&self) -> bool {
        !self.drained && !self.maintenance && self.weight.is_none()
    }

    /// The state the table shows, from the health state. Docker stopping the container wins
    /// (it is going away), then maintenance, then drain.
    pub fn state(&self, health: BackendState) -> BackendState {
        match health {
            BackendState::Draining => BackendState::Draining,
            _ if self.maintenance => BackendState::Maintenance,
            _ if self.drained => BackendState::Drained,
            state => state,
        }
    }

    pub fn weight(&self, label_weight: u32) -> u32 {
        self.weight.unwrap_or(label_weight)
    }
}

/// One change an operator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Drain,
    Undrain,
    /// `None` removes the weight override (the label's weight applies again).
    Weight(Option<u32>),
    Maintenance(bool),
}

impl Change {
    /// Checks what the API cannot express by type: the weight range of the label.
    pub fn validate(self) -> Result<Self, String> {
        match self {
            Self::Weight(Some(w)) if w > MAX_WEIGHT => Err(format!(
                "weight {w}: use 0 to {MAX_WEIGHT} (0 takes no new traffic), as the \
                 aliyun.routing.weight label"
            )),
            change => Ok(change),
        }
    }

    fn apply(self, o: &mut Override) {
        match self {
            Self::Drain => o.drained = true,
            Self::Undrain => o.drained = false,
            Self::Weight(w) => o.weight = w,
            Self::Maintenance(on) => o.maintenance = on,
        }
    }

    /// For the event log and the history.
    pub fn describe(self) -> String {
        match self {
            Self::Drain => "override: drained".into(),
            Self::Undrain => "override: undrained".into(),
            Self::Weight(Some(w)) => format!("override: weight {w}"),
            Self::Weight(None) => "override: weight from the label again".into(),
            Self::Maintenance(true) => "override: maintenance on".into(),
            Self::Maintenance(false) => "override: maintenance off".into(),
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct StateFile {
    version: u32,
    overrides: BTreeMap<String, Override>,
}

/// Every override, by container name, and where they are kept.
#[derive(Debug, Default)]
pub struct Overrides {
    /// `None`: kept in memory only (no usable state directory).
    path: Option<PathBuf>,
    by_name: BTreeMap<String, Override>,
}

impl Overrides {
    /// Reads the state file in `state_dir` (none yet is fine). An unreadable or corrupt file is
    /// an error: starting without the operator's drains would send traffic where they said not to.
    pub fn load(state_dir: Option<&Path>) -> anyhow::Result<Self> {
        let Some(dir) = state_dir else {
            return Ok(Self::default());
        };
        let path = dir.join(STATE_FILE);
        let by_name = match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str::<StateFile>(&text)
                    .with_context(|| {
                        format!(
                            "parsing the overrides in {}; fix or remove the file (it is \
                             rewritten by `router-agent ctl`)",
                            path.display()
                        )
                    })?
                    .overrides
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the overrides in {}", path.display()));
            }
        };
        Ok(Self {
            path: Some(path),
            by_name,
        })
    }

    pub fn get(&self, name: &str) -> Option<&Override> {
        self.by_name.get(name)
    }

    /// A copy for readers outside the registry.
    pub fn snapshot(&self) -> BTreeMap<String, Override> {
        self.by_name.clone()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Override)> {
        self.by_name.iter()
    }

    /// Applies a change and saves; returns the override now in force. On a failed save the
    /// change is undone, so what the agent does matches what it would do after a restart.
    pub fn change(&mut self, name: &str, change: Change, now_ms: u64) -> anyhow::Result<Override> {
        let before = self.by_name.get(name).cloned();
        let entry = self.by_name.entry(name.to_owned()).or_default();
        change.apply(entry);
        entry.updated_unix_ms = now_ms;
        let after = entry.clone();
        if after.is_empty() {
            self.by_name.remove(name);
        }
        if let Err(e) = self.save() {
            match before {
                Some(before) => self.by_name.insert(name.to_owned(), before),
                None => self.by_name.remove(name),
            };
            return Err(e);
        }
        Ok(after)
    }

    /// Removes every override of these names; returns the ones that were there.
    pub fn clear(&mut self, names: &[String]) -> anyhow::Result<Vec<String>> {
        let removed: Vec<(String, Override)> = names
            .iter()
            .filter_map(|n| self.by_name.remove_entry(n))
            .collect();
        if let Err(e) = self.save() {
            self.by_name.extend(removed);
            return Err(e);
        }
        Ok(removed.into_iter().map(|(n, _)| n).collect())
    }

    /// Writes the file atomically: a temporary file in the same directory, flushed, renamed
    /// over the old one (a crash leaves the old file or the new one, never half of one).
    fn save(&self) -> anyhow::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let text = serde_json::to_string_pretty(&StateFile {
            version: 1,
            overrides: self.by_name.clone(),
        })?;
        let tmp = path.with_extension(format!("json.tmp.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write()
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .with_context(|| {
                format!(
                    "saving the overrides to {}; is --state-dir writable?",
                    path.display()
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_precedence() {
        use BackendState::{Down, Drained, Draining, Maintenance, Starting, Up};
        let none = Override::default();
        let drained = Override {
            drained: true,
            ..Override::default()
        };
        let maint = Override {
            drained: true,
            maintenance: true,
            ..Override::default()
        };
        for (o, health, shown) in [
            (&none, Up, Up),
            (&none, Down, Down),
            (&drained, Up, Drained),
            (&drained, Starting, Drained),
            (&drained, Draining, Draining),
            (&maint, Down, Maintenance),
            (&maint, Up, Maintenance),
            (&maint, Draining, Draining),
        ] {
            assert_eq!(o.state(health), shown, "{o:?} {health:?}");
        }
    }

    #[test]
    fn weight_override_replaces_the_label() {
        let o = Override {
            weight: Some(0),
            ..Override::default()
        };
        assert_eq!(o.weight(100), 0);
        assert_eq!(Override::default().weight(30), 30);
        assert!(Change::Weight(Some(101)).validate().is_err());
        assert!(Change::Weight(Some(100)).validate().is_ok());
    }

    #[test]
    fn persisted_atomically_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("overrides-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut o = Overrides::load(Some(&dir)).unwrap();
        o.change("web-blue", Change::Weight(Some(10)), 1).unwrap();
        o.change("web-green", Change::Drain, 2).unwrap();
        o.change("web-green", Change::Undrain, 3).unwrap();
        let again = Overrides::load(Some(&dir)).unwrap();
        assert_eq!(again.get("web-blue").and_then(|o| o.weight), Some(10));
        // Undrained with nothing else set: no override left at all.
        assert!(again.get("web-green").is_none());
        assert!(
            !std::fs::read_dir(&dir)
                .unwrap()
                .any(|e| { e.unwrap().file_name().to_string_lossy().contains(".tmp") })
        );
        let mut again = again;
        assert_eq!(again.clear(&["web-blue".into()]).unwrap(), vec!["web-blue"]);
        assert!(
            Overrides::load(Some(&dir))
                .unwrap()
                .get("web-blue")
                .is_none()
        );
        std::fs::write(dir.join(STATE_FILE), "{not json").unwrap();
        let err = Overrides::load(Some(&dir)).unwrap_err();
        assert!(format!("{err:#}").contains("fix or remove"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
