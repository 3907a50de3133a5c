//! Loads engine settings: `--config FILE`, else `orderly.toml` if present,
//! then `ORDERLY_*` environment overrides (`ORDERLY_INVENTORY__SAFETY_STOCK_PCT=10`
//! sets `inventory.safety_stock_pct`; `__` separates levels).

use anyhow::{Context, Result, bail};
use orderly_engine::config::Settings;
use std::path::Path;

/// Most bytes read from a configuration file.
const CONFIG_BYTES_MAX: u64 = 1 << 20;

/// Reads settings from a file (if any) and the environment.
pub fn load(explicit: Option<&Path>, env: impl Iterator<Item = (String, String)>) -> Result<Settings> {
    let mut doc = match explicit {
        Some(path) => read(path)?,
        None if Path::new("orderly.toml").exists() => read(Path::new("orderly.toml"))?,
        None => toml::Table::new(),
    };
    for (key, value) in env {
        let Some(rest) = key.strip_prefix("ORDERLY_") else { continue };
        if !rest.contains("__") {
            continue; // ORDERLY_LISTEN etc. are CLI flags, not settings.
        }
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        set_path(&mut doc, &path, parse_scalar(&value)).with_context(|| format!("environment variable {key}"))?;
    }
    parse(doc)
}

/// Parses settings from TOML text (for `orderly.toml` and tests).
pub fn parse_str(text: &str) -> Result<Settings> {
    let doc: toml::Table = toml::from_str(text).context("configuration is not valid TOML")?;
    parse(doc)
}

fn parse(doc: toml::Table) -> Result<Settings> {
    let settings: Settings = toml::Value::Table(doc).try_into().context("invalid configuration")?;
    Ok(settings)
}

fn read(path: &Path) -> Result<toml::Table> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read config {}", path.display()))?;
    if meta.len() > CONFIG_BYTES_MAX {
        bail!("config {} is larger than {CONFIG_BYTES_MAX} bytes", path.display());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config {} is not valid TOML", path.display()))
}

fn parse_scalar(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(doc: &mut toml::Table, path: &[String], value: toml::Value) -> Result<()> {
    let (last, parents) = path.split_last().context("empty key")?;
    let mut table = doc;
    for p in parents {
        let entry = table.entry(p.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().with_context(|| format!("{p} is not a table"))?;
    }
    // Money keys are strings in the settings; numbers from the environment
    // are converted back so `ORDERLY_SPLIT__MIN_ORDER_VALUE_FOR_PARTIAL=50` works.
    let value = match (&value, last.contains("value")) {
        (toml::Value::Integer(i), true) => toml::Value::String(i.to_string()),
        _ => value,
    };
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("o.toml");
        std::fs::write(&path, "[inventory]\nsafety_stock_pct = 7\nhold_ttl = \"10m\"\n").expect("write");
        let env = vec![
            ("ORDERLY_INVENTORY__SAFETY_STOCK_PCT".to_owned(), "9".to_owned()),
            ("ORDERLY_SPLIT__MIN_ORDER_VALUE_FOR_PARTIAL".to_owned(), "75.00".to_owned()),
            ("ORDERLY_LISTEN".to_owned(), "ignored".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        let s = load(Some(&path), env.into_iter()).expect("valid");
        assert_eq!(s.inventory.safety_stock_pct, 9);
        assert_eq!(s.inventory.hold_ttl.0, 600_000);
        assert_eq!(s.split.min_order_value_for_partial.minor(), 7500);
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let err = parse_str("[inventory]\nsafety_pct = 5\n").expect_err("unknown key");
        assert!(format!("{err:#}").contains("safety_pct"), "{err:#}");
        assert!(parse_str("[picking]\nstarvation_limit = \"soon\"\n").is_err());
    }
}
