//! Canonical target URLs (contract §6): the identity part of a delivery target.

use std::net::IpAddr;

use url::{Host, Url};

use crate::error::{Error, Result};

/// A validated URL and its canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl {
    /// What the operator gave, trimmed (used verbatim for external endpoints).
    pub raw: String,
    /// Scheme and host lower-cased, IDNA host, default port dropped, no trailing `/`,
    /// no query, fragment or user info.
    pub canonical: String,
    /// `scheme://host[:port]`, where the health endpoint lives.
    pub origin: String,
}

/// Validates and canonicalises an operator-supplied URL.
pub fn canonicalize(input: &str) -> Result<TargetUrl> {
    let raw = input.trim();
    let url = Url::parse(raw).map_err(|e| invalid(raw, &e.to_string()))?;
    let scheme = url.scheme();
    if scheme != "https" && scheme != "http" {
        return Err(invalid(raw, &format!("scheme {scheme:?} is not supported")));
    }
    let host = url.host().ok_or_else(|| invalid(raw, "it has no host"))?;
    if has_empty_port(raw) {
        // `Url` reads `host:` as the default port; an operator who typed a colon meant a port.
        return Err(invalid(raw, "the port after ':' is empty"));
    }
    if scheme == "http" && !is_loopback(&host) {
        return Err(Error::usage(
            format!("invalid URL {:?}: http:// is accepted only for loopback hosts", redact_url(raw)),
            "use https:// for remote servers (http:// is allowed for localhost, 127.0.0.0/8 and [::1])",
        ));
    }
    let host_text = match &host {
        Host::Domain(d) => d.trim_end_matches('.').to_string(),
        Host::Ipv4(ip) => ip.to_string(),
        Host::Ipv6(ip) => format!("[{ip}]"),
    };
    if host_text.is_empty() {
        return Err(invalid(raw, "it has no host"));
    }
    // `Url` already drops the scheme's default port.
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let origin = format!("{scheme}://{host_text}{port}");
    let path = url.path().trim_end_matches('/');
    Ok(TargetUrl { raw: raw.to_string(), canonical: format!("{origin}{path}"), origin })
}

/// `scheme://[userinfo@]host:/...`: the authority ends in a bare `:`.
fn has_empty_port(raw: &str) -> bool {
    let Some((_, rest)) = raw.split_once("://") else { return false };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host_port.ends_with(':')
}

/// What stands in for a secret wherever one would be shown or stored.
pub const REDACTED: &str = "***";

/// Query parameter names whose values are secrets (`api_key`, `access_token`, `sig`, ...).
const SECRET_QUERY_NAMES: [&str; 8] = ["key", "token", "secret", "password", "passwd", "auth", "sig", "credential"];

/// The one way a URL is shown: the password of its user info and the values of key-like
/// query parameters replaced by `***`. Text that does not parse as a URL keeps only what
/// cannot be user info.
pub fn redact_url(raw: &str) -> String {
    let Ok(mut url) = Url::parse(raw.trim()) else {
        return redact_unparsed(raw);
    };
    let secret = |name: &str| {
        let name = name.to_ascii_lowercase();
        SECRET_QUERY_NAMES.iter().any(|s| name.contains(s))
    };
    let secret_query = url.query_pairs().any(|(name, _)| secret(&name));
    if url.password().is_none() && !secret_query {
        // Nothing to hide: show exactly what the operator wrote.
        return raw.to_string();
    }
    if url.password().is_some() {
        let _ = url.set_password(Some(REDACTED));
    }
    if secret_query {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(n, v)| {
                let value = if secret(&n) { REDACTED.to_string() } else { v.into_owned() };
                (n.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // `Url` would add a `/` to a bare origin; keep what the operator wrote otherwise.
    let shown = url.to_string();
    if raw.trim().ends_with('/') || url.path() != "/" { shown } else { shown.trim_end_matches('/').to_string() }
}

/// `scheme://user:pass@rest` that `Url` refused: drop everything before the last `@` of the
/// authority.
fn redact_unparsed(raw: &str) -> String {
    let Some((scheme, rest)) = raw.split_once("://") else { return raw.to_string() };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://{REDACTED}@{host}{}", &rest[end..]),
        None => raw.to_string(),
    }
}

fn invalid(raw: &str, why: &str) -> Error {
    let raw = redact_url(raw);
    Error::usage(
        format!("invalid URL {raw:?}: {why}"),
        "give a full URL with scheme and host, e.g. https://teamspace.example.com or http://127.0.0.1:8787",
    )
}

fn is_loopback(host: &Host<&str>) -> bool {
    match host {
        Host::Domain(d) => d.eq_ignore_ascii_case("localhost") || d.eq_ignore_ascii_case("localhost."),
        Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        Host::Ipv6(ip) => ip.is_loopback(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> String {
        canonicalize(s).unwrap().canonical
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(canon("HTTPS://Example.COM:443/api/"), "https://example.com/api");
        assert_eq!(canon("https://example.com/"), "https://example.com");
        assert_eq!(canon("https://example.com:8443/a//"), "https://example.com:8443/a");
        assert_eq!(canon("https://h.io:80/"), "https://h.io:80");
        assert_eq!(canon("https://example.com/x?q=1#frag"), "https://example.com/x");
        assert_eq!(canon("https://user:secret@example.com/x"), "https://example.com/x");
        assert_eq!(canon("https://bücher.de/"), "https://xn--bcher-kva.de");
        assert_eq!(canon("http://[::1]:8080/a"), "http://[::1]:8080/a");
        assert_eq!(canon("http://127.0.0.5:80/"), "http://127.0.0.5");
        assert_eq!(canon("http://LOCALHOST:8787/api/v1/events/batch/"), "http://localhost:8787/api/v1/events/batch");
        assert_eq!(canon("  https://example.com/Path/ "), "https://example.com/Path");
    }

    #[test]
    fn secrets_in_urls_are_redacted() {
        assert_eq!(
            redact_url("https://alice:hunter2@example.com/batch/?api_key=abc&team=x&access_token=t"),
            "https://alice:***@example.com/batch/?api_key=***&team=x&access_token=***"
        );
        assert_eq!(redact_url("http://127.0.0.1:8787"), "http://127.0.0.1:8787");
        assert_eq!(redact_url("https://example.com/x?page=2"), "https://example.com/x?page=2");
        assert_eq!(redact_url("https://u:p@ex ample.com/x"), "https://***@ex ample.com/x");
        let err = canonicalize("ftp://u:hunter2@example.com/").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn origin_is_scheme_host_port() {
        let t = canonicalize("http://127.0.0.1:9000/api/v1/events/batch/").unwrap();
        assert_eq!(t.origin, "http://127.0.0.1:9000");
    }

    #[test]
    fn invalid_urls_are_usage_errors() {
        for bad in [
            "ftp://x",
            "https://",
            "http://example.com",
            "example.com",
            "",
            "not a url",
            "http://10.0.0.1/",
            "http://127.0.0.1:/x",
            "https://u:p@example.com:?q",
        ] {
            let err = canonicalize(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
            assert!(!err.hint().is_empty());
        }
    }
}
