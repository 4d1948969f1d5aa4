//! Named targets in `config.toml` (contract §9): `[[event_sync.targets]]` entries read into
//! [`NamedTargets`], and the edits `kitty-sync target add|remove|enable|disable` make to the
//! operator's file (comments and everything else kept).
//!
//! Reading is lenient at load (a broken entry must not stop `emit`: capture comes before every
//! gate) and strict on use: [`NamedTargets::get`] is the configuration error, exit 2.

use std::path::Path;

use crate::error::{Error, Result};
use crate::target_url::{TargetUrl, canonicalize};

/// The name the mode's own target goes by in `target list` and `now --target`.
pub const PRIMARY: &str = "primary";
const MAX_NAME_LEN: usize = 32;

/// One `[[event_sync.targets]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedTarget {
    pub name: String,
    /// Posted to verbatim; its canonical form is the target's identity.
    pub endpoint: TargetUrl,
    pub token_env: Option<String>,
    /// `None`: every event type.
    pub types: Option<Vec<String>>,
    pub enabled: bool,
}

impl NamedTarget {
    /// Whether events of `event_type` go to this target.
    pub fn accepts(&self, event_type: &str) -> bool {
        self.types.as_ref().is_none_or(|types| types.iter().any(|t| t == event_type))
    }
}

/// The named targets of a `config.toml`, or why they cannot be used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamedTargets {
    targets: Vec<NamedTarget>,
    problem: Option<(String, String)>,
}

impl NamedTargets {
    /// Reads `event_sync.targets` of a parsed `config.toml`.
    pub fn parse(table: &toml::Table, path: &Path) -> NamedTargets {
        match parse_entries(table, path) {
            Ok(targets) => NamedTargets { targets, problem: None },
            Err(Error::Usage { message, hint }) => NamedTargets { targets: Vec::new(), problem: Some((message, hint)) },
            Err(other) => NamedTargets { targets: Vec::new(), problem: Some((other.to_string(), other.hint().into())) },
        }
    }

    /// Every configured named target in file order; a broken entry is a usage error.
    pub fn get(&self) -> Result<&[NamedTarget]> {
        match &self.problem {
            None => Ok(&self.targets),
            Some((message, hint)) => Err(Error::usage(message.clone(), hint.clone())),
        }
    }

    /// The enabled ones, in file order.
    pub fn enabled(&self) -> Result<Vec<&NamedTarget>> {
        Ok(self.get()?.iter().filter(|t| t.enabled).collect())
    }
}

fn parse_entries(table: &toml::Table, path: &Path) -> Result<Vec<NamedTarget>> {
    let Some(entries) = table.get("event_sync").and_then(|t| t.as_table()).and_then(|t| t.get("targets")) else {
        return Ok(Vec::new());
    };
    let entries = entries.as_array().ok_or_else(|| bad_entry(path, "event_sync.targets is not an array of tables"))?;
    let mut out: Vec<NamedTarget> = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let at = |why: &str| bad_entry(path, &format!("[[event_sync.targets]] entry {}: {why}", index + 1));
        let entry = entry.as_table().ok_or_else(|| at("not a table"))?;
        let text = |key: &str| -> Result<Option<String>> {
            match entry.get(key) {
                None => Ok(None),
                Some(v) => {
                    v.as_str().map(|s| Some(s.trim().to_string())).ok_or_else(|| at(&format!("{key} is not a string")))
                }
            }
        };
        let name = text("name")?.ok_or_else(|| at("name is missing"))?;
        validate_name(&name).map_err(|e| at(&e.to_string()))?;
        if out.iter().any(|t| t.name == name) {
            return Err(at(&format!("the name {name:?} is used twice")));
        }
        let endpoint = text("endpoint")?.ok_or_else(|| at("endpoint is missing"))?;
        let endpoint = canonicalize(&endpoint).map_err(|e| at(&e.to_string()))?;
        let token_env = text("token_env")?.filter(|v| !v.is_empty());
        if let Some(var) = &token_env {
            validate_env_name(var).map_err(|e| at(&e.to_string()))?;
        }
        let types = match entry.get("types") {
            None => None,
            Some(v) => {
                let items = v.as_array().ok_or_else(|| at("types is not an array of strings"))?;
                let types: Option<Vec<String>> = items.iter().map(|t| t.as_str().map(str::to_string)).collect();
                Some(types.ok_or_else(|| at("types is not an array of strings"))?)
            }
        };
        let enabled = match entry.get("enabled") {
            None => true,
            Some(v) => v.as_bool().ok_or_else(|| at("enabled is not true or false"))?,
        };
        out.push(NamedTarget { name, endpoint, token_env, types, enabled });
    }
    Ok(out)
}

fn bad_entry(path: &Path, why: &str) -> Error {
    Error::usage(
        format!("{}: {why}", path.display()),
        format!("fix the entry in {} by hand, or remove it with `kitty-sync target remove NAME`", path.display()),
    )
}

/// `^[a-z0-9][a-z0-9-]{0,31}$`, and not the reserved `primary`.
pub fn validate_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.len() <= MAX_NAME_LEN;
    if !valid {
        return Err(Error::usage(
            format!("invalid target name {name:?}"),
            "use 1-32 lower-case letters, digits and '-', starting with a letter or digit (e.g. audit, preview-2)",
        ));
    }
    if name == PRIMARY {
        return Err(Error::usage(
            "the target name \"primary\" is reserved for the mode's own target",
            "pick another name; the primary target is set with `kitty-sync mode`",
        ));
    }
    Ok(())
}

/// An environment variable's NAME (never a token pasted by mistake).
pub fn validate_env_name(var: &str) -> Result<()> {
    let mut chars = var.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        // The value is not echoed: what was passed may be the token itself.
        Err(Error::usage(
            "invalid token variable: not an environment variable name (the value is not shown)",
            "pass the variable's NAME (e.g. --token-env RECEIVER_TOKEN), never the token itself",
        ))
    }
}

/// What `target add` writes.
#[derive(Debug, Clone)]
pub struct NewTarget {
    pub name: String,
    pub endpoint: String,
    pub token_env: Option<String>,
    pub types: Vec<String>,
    pub enabled: bool,
}

/// Appends a `[[event_sync.targets]]` entry. A name or canonical URL already configured is
/// refused (exit 2), as are invalid ones.
pub fn add(doc: &mut toml_edit::DocumentMut, path: &Path, new: &NewTarget) -> Result<()> {
    validate_name(&new.name)?;
    let url = canonicalize(&new.endpoint)?;
    if let Some(var) = &new.token_env {
        validate_env_name(var)?;
    }
    if new.types.iter().any(|t| t.trim().is_empty()) {
        return Err(Error::usage("an empty --type was given", "pass event types such as --type WPStatusChanged"));
    }
    let targets = targets_array(doc, path, true)?.ok_or_else(|| not_an_array(path))?;
    for existing in targets.iter() {
        if existing.get("name").and_then(|v| v.as_str()) == Some(new.name.as_str()) {
            return Err(Error::usage(
                format!("a target named {:?} already exists", new.name),
                "pick another name, or `kitty-sync target remove NAME` first (see `kitty-sync target list`)",
            ));
        }
        let same_url = existing
            .get("endpoint")
            .and_then(|v| v.as_str())
            .and_then(|e| canonicalize(e).ok())
            .is_some_and(|e| e.canonical == url.canonical);
        if same_url {
            let other = existing.get("name").and_then(|v| v.as_str()).unwrap_or("?");
            return Err(Error::usage(
                format!("{} is already the endpoint of target {other:?}", url.canonical),
                "one URL is one target: change that target instead, or remove it first",
            ));
        }
    }
    let mut table = toml_edit::Table::new();
    table.insert("name", toml_edit::value(new.name.as_str()));
    table.insert("endpoint", toml_edit::value(url.raw.as_str()));
    if let Some(var) = &new.token_env {
        table.insert("token_env", toml_edit::value(var.as_str()));
    }
    if !new.types.is_empty() {
        let mut types = toml_edit::Array::new();
        let mut seen = Vec::new();
        for t in &new.types {
            if !seen.contains(t) {
                types.push(t.as_str());
                seen.push(t.clone());
            }
        }
        table.insert("types", toml_edit::value(types));
    }
    table.insert("enabled", toml_edit::value(new.enabled));
    targets.push(table);
    Ok(())
}

/// Removes the entry called `name` (its ledger history stays in the store).
pub fn remove(doc: &mut toml_edit::DocumentMut, path: &Path, name: &str) -> Result<()> {
    let targets = targets_array(doc, path, false)?;
    let index = targets.as_ref().and_then(|t| position(t, name)).ok_or_else(|| unknown(name))?;
    if let Some(targets) = targets {
        targets.remove(index);
    }
    let now_empty = targets_array(doc, path, false)?.is_some_and(|t| t.is_empty());
    if now_empty && let Some(event_sync) = doc.get_mut("event_sync").and_then(|t| t.as_table_like_mut()) {
        event_sync.remove("targets");
    }
    Ok(())
}

/// Sets `enabled` of the entry called `name`, keeping the line's comment.
pub fn set_enabled(doc: &mut toml_edit::DocumentMut, path: &Path, name: &str, enabled: bool) -> Result<()> {
    let targets = targets_array(doc, path, false)?;
    let Some((targets, index)) = targets.and_then(|t| position(t, name).map(|i| (t, i))) else {
        return Err(unknown(name));
    };
    let Some(entry) = targets.get_mut(index) else { return Err(unknown(name)) };
    let mut value = toml_edit::Value::from(enabled);
    if let Some(old) = entry.get("enabled").and_then(|v| v.as_value()) {
        *value.decor_mut() = old.decor().clone();
    }
    entry.insert("enabled", toml_edit::Item::Value(value));
    Ok(())
}

fn position(targets: &toml_edit::ArrayOfTables, name: &str) -> Option<usize> {
    targets.iter().position(|t| t.get("name").and_then(|v| v.as_str()).map(str::trim) == Some(name))
}

/// `event_sync.targets` as an array of tables, created when `create` (never replacing
/// anything the operator wrote that is not one).
fn targets_array<'d>(
    doc: &'d mut toml_edit::DocumentMut,
    path: &Path,
    create: bool,
) -> Result<Option<&'d mut toml_edit::ArrayOfTables>> {
    if !create && doc.get("event_sync").is_none() {
        return Ok(None);
    }
    // Implicit: a file without `[event_sync]` gets only the `[[event_sync.targets]]` headers.
    let event_sync = doc.entry("event_sync").or_insert_with(|| {
        let mut table = toml_edit::Table::new();
        table.set_implicit(true);
        toml_edit::Item::Table(table)
    });
    let event_sync = event_sync.as_table_like_mut().ok_or_else(|| {
        Error::usage(
            format!("{}: `event_sync` is not a table", path.display()),
            format!(
                "edit {} by hand so that `event_sync` is an [event_sync] table; nothing was changed",
                path.display()
            ),
        )
    })?;
    if event_sync.get("targets").is_none() {
        if !create {
            return Ok(None);
        }
        event_sync.insert("targets", toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()));
    }
    match event_sync.get_mut("targets") {
        Some(toml_edit::Item::ArrayOfTables(targets)) => Ok(Some(targets)),
        _ => Err(not_an_array(path)),
    }
}

fn not_an_array(path: &Path) -> Error {
    Error::usage(
        format!("{}: `event_sync.targets` is not an array of [[event_sync.targets]] tables", path.display()),
        format!("edit {} by hand (one [[event_sync.targets]] table per target); nothing was changed", path.display()),
    )
}

fn unknown(name: &str) -> Error {
    Error::usage(
        format!("no target named {name:?} in config.toml"),
        "see the configured targets with `kitty-sync target list`",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> NamedTargets {
        NamedTargets::parse(&text.parse::<toml::Table>().unwrap(), Path::new("config.toml"))
    }

    #[test]
    fn reads_entries_with_defaults() {
        let targets = parse(
            "[event_sync]\nmode = \"teamspace\"\n\n[[event_sync.targets]]\nname = \"audit\"\nendpoint = \"http://127.0.0.1:8787/api/v1/events/batch/\"\ntypes = [\"A\"]\n\n[[event_sync.targets]]\nname = \"b-2\"\nendpoint = \"https://b.example/x\"\ntoken_env = \"B_TOKEN\"\nenabled = false\n",
        );
        let list = targets.get().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].endpoint.canonical, "http://127.0.0.1:8787/api/v1/events/batch");
        assert!(list[0].enabled && list[0].accepts("A") && !list[0].accepts("B"));
        assert!(!list[1].enabled && list[1].accepts("anything"));
        assert_eq!(list[1].token_env.as_deref(), Some("B_TOKEN"));
        assert_eq!(targets.enabled().unwrap().len(), 1);
    }

    #[test]
    fn broken_entries_are_usage_errors_on_use() {
        for bad in [
            "[[event_sync.targets]]\nname = \"Audit\"\nendpoint = \"https://a.example\"\n",
            "[[event_sync.targets]]\nname = \"primary\"\nendpoint = \"https://a.example\"\n",
            "[[event_sync.targets]]\nname = \"a\"\nendpoint = \"http://a.example\"\n",
            "[[event_sync.targets]]\nname = \"a\"\n",
            "[[event_sync.targets]]\nname = \"a\"\nendpoint = \"https://a.example\"\n[[event_sync.targets]]\nname = \"a\"\nendpoint = \"https://b.example\"\n",
            "[[event_sync.targets]]\nname = \"a\"\nendpoint = \"https://a.example\"\nenabled = \"yes\"\n",
            "[event_sync]\ntargets = 3\n",
        ] {
            let err = parse(bad).get().unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            assert!(err.to_string().contains("config.toml"), "{err}");
        }
        assert!(validate_name(&"a".repeat(32)).is_ok());
        assert!(validate_name(&"a".repeat(33)).is_err());
        assert!(validate_name("-a").is_err());
    }

    #[test]
    fn edits_keep_comments_and_refuse_duplicates() {
        let text = "# mine\n[event_sync]\nmode = \"teamspace\" # keep\n\n[[event_sync.targets]]\nname = \"a\"\nendpoint = \"https://a.example\"\nenabled = true # on purpose\n";
        let mut doc = text.parse::<toml_edit::DocumentMut>().unwrap();
        let path = Path::new("config.toml");
        let new = |name: &str, endpoint: &str| NewTarget {
            name: name.into(),
            endpoint: endpoint.into(),
            token_env: None,
            types: vec!["X".into(), "X".into()],
            enabled: true,
        };
        add(&mut doc, path, &new("b", "http://127.0.0.1:9/")).unwrap();
        assert_eq!(add(&mut doc, path, &new("a", "https://c.example")).unwrap_err().exit_code(), 2);
        assert_eq!(add(&mut doc, path, &new("c", "HTTPS://A.example/")).unwrap_err().exit_code(), 2);
        set_enabled(&mut doc, path, "a", false).unwrap();
        let out = doc.to_string();
        assert!(
            out.contains("# mine") && out.contains("# keep") && out.contains("enabled = false # on purpose"),
            "{out}"
        );
        let parsed = parse(&out);
        let list = parsed.get().unwrap();
        assert_eq!(list.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(list[1].types.as_deref(), Some(&["X".to_string()][..]));
        remove(&mut doc, path, "a").unwrap();
        remove(&mut doc, path, "b").unwrap();
        assert_eq!(remove(&mut doc, path, "b").unwrap_err().exit_code(), 2);
        assert!(parse(&doc.to_string()).get().unwrap().is_empty());
        assert!(doc.to_string().contains("# keep"));
    }
}
