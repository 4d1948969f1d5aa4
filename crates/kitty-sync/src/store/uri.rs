//! SQLite `file:` URIs that name exactly the given path, whatever bytes it holds.
//!
//! SQLite decodes `%XX` in the path of a URI and treats `?` and `#` as delimiters; a path
//! starting with `//` after `file:` would be read as an authority. So the path is made
//! absolute, every byte outside a small safe set is percent-encoded (non-UTF-8 bytes
//! included), and the URI is `file://` + path: always an empty authority.

use std::path::Path;

/// `file://<percent-encoded absolute path>?<query>`.
pub(crate) fn file_uri(path: &Path, query: &str) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let bytes = path_bytes(&absolute);
    let mut out = String::with_capacity(bytes.len() + query.len() + 8);
    out.push_str("file://");
    for b in bytes {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'.' | b'_' | b'-' | b'~' => out.push(char::from(b)),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    if !query.is_empty() {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(unix)]
fn path_bytes(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().to_vec()
}

#[cfg(not(unix))]
fn path_bytes(path: &Path) -> Vec<u8> {
    path.to_string_lossy().replace('\\', "/").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_sqlite_would_read_differently() {
        let p = Path::new("/tmp/a b/q?x#y%z/é.db");
        assert_eq!(file_uri(p, "mode=ro"), "file:///tmp/a%20b/q%3Fx%23y%25z/%C3%A9.db?mode=ro");
        assert_eq!(file_uri(Path::new("//tmp/x.db"), ""), "file:////tmp/x.db", "empty authority");
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_bytes_round_trip() {
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/caf\xe9/s.db"));
        assert_eq!(file_uri(p, "mode=ro"), "file:///tmp/caf%E9/s.db?mode=ro");
    }
}
