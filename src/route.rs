//! The gateway's two routes, recognised by a `match` over path segments.
//!
//! Anything that is not exactly one of the two progress endpoints is refused here,
//! before any cache or upstream work: the gateway must not become a general proxy
//! carrying its credentials to other Huawei Cloud APIs.

use std::cell::RefCell;

use http::Method;

use crate::recent::Recent;

/// Which upstream API a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// DRS v5 `ShowExportProgress`.
    Drs,
    /// ROMA Connect `CheckAssetJobStatus`.
    Roma,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Drs => "drs",
            Api::Roma => "roma",
        }
    }
}

/// A recognised request, borrowing its identifiers from the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route<'a> {
    pub api: Api,
    pub project: &'a str,
    /// Present for ROMA only.
    pub instance: Option<&'a str>,
    pub job: &'a str,
}

impl Route<'_> {
    /// The upstream path: rebuilt from validated segments, never copied from the client.
    pub fn upstream_path(&self) -> String {
        match (self.api, self.instance) {
            (Api::Roma, Some(instance)) => format!(
                "/v2/{}/instances/{}/assets/jobs/{}",
                self.project, instance, self.job
            ),
            _ => format!("/v5/{}/jobs/{}/export/progress", self.project, self.job),
        }
    }
}

/// Why a request does not match a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteError {
    /// Not one of the two endpoints.
    NotFound,
    /// A known endpoint with a method other than GET or HEAD.
    MethodNotAllowed,
    /// A known endpoint shape whose identifiers are unacceptable.
    Malformed(&'static str),
}

/// Longest identifier accepted. Huawei's IDs are 32 hex characters or UUIDs (36).
pub const MAX_SEGMENT_LEN: usize = 64;

/// Matches `method` and `path` (without query) against the two routes.
pub fn parse<'a>(method: &Method, path: &'a str) -> Result<Route<'a>, RouteError> {
    if method != Method::GET && method != Method::HEAD {
        // An unknown path is unknown whatever the method.
        match_path(path)?;
        return Err(RouteError::MethodNotAllowed);
    }
    thread_local! {
        /// Paths that matched lately, and where their identifiers lie.
        static RECENT: RefCell<Recent<Shape>> = RefCell::new(Recent::new(256));
    }
    let shape = RECENT.with_borrow_mut(|recent| {
        recent.get_or(path.as_bytes(), || {
            checked(path).map(|route| Shape::of(path, &route))
        })
    })?;
    Ok(shape.route(path))
}

/// A route whose identifiers have been checked.
fn checked(path: &str) -> Result<Route<'_>, RouteError> {
    let route = match_path(path)?;
    for id in [Some(route.project), route.instance, Some(route.job)]
        .into_iter()
        .flatten()
    {
        check_segment(id)?;
    }
    Ok(route)
}

/// A route as positions in its path, to be remembered with the path.
#[derive(Clone, Copy)]
struct Shape {
    api: Api,
    project: (usize, usize),
    instance: Option<(usize, usize)>,
    job: (usize, usize),
}

impl Shape {
    fn of(path: &str, route: &Route) -> Shape {
        // Each identifier is a slice of `path`.
        let at = |id: &str| {
            let start = id.as_ptr() as usize - path.as_ptr() as usize;
            (start, start + id.len())
        };
        Shape {
            api: route.api,
            project: at(route.project),
            instance: route.instance.map(at),
            job: at(route.job),
        }
    }

    /// The route in `path`, which holds the bytes this shape was taken from.
    fn route(self, path: &str) -> Route<'_> {
        let id = |(start, end): (usize, usize)| &path[start..end];
        Route {
            api: self.api,
            project: id(self.project),
            instance: self.instance.map(id),
            job: id(self.job),
        }
    }
}

fn match_path(path: &str) -> Result<Route<'_>, RouteError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(RouteError::NotFound);
    };
    // Collect at most 8 segments: both routes have 6 or 7, so a longer path is
    // unknown without us walking an arbitrarily long one.
    let mut segments = [""; 8];
    let (mut count, mut start) = (0, 0);
    // A plain byte loop: `split('/')` searches for each of a path's seven
    // slashes with a separate call, a fifth slower on these short segments.
    for (at, byte) in rest.bytes().enumerate() {
        if byte == b'/' {
            if count == segments.len() - 1 {
                return Err(RouteError::NotFound);
            }
            segments[count] = &rest[start..at];
            (count, start) = (count + 1, at + 1);
        }
    }
    segments[count] = &rest[start..];
    count += 1;
    match &segments[..count] {
        ["v5", project, "jobs", job, "export", "progress"] => Ok(Route {
            api: Api::Drs,
            project,
            instance: None,
            job,
        }),
        ["v2", project, "instances", instance, "assets", "jobs", job] => Ok(Route {
            api: Api::Roma,
            project,
            instance: Some(instance),
            job,
        }),
        // A trailing slash on a known route is a client mistake worth naming.
        ["v5", _, "jobs", _, "export", "progress", ""]
        | ["v2", _, "instances", _, "assets", "jobs", _, ""] => {
            Err(RouteError::Malformed("trailing slash after the route"))
        }
        _ => Err(RouteError::NotFound),
    }
}

/// `[A-Za-z0-9_-]` as a table: one load per byte on every request's path.
const ALLOWED: [bool; 256] = {
    let mut allowed = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        allowed[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
        b += 1;
    }
    allowed
};

fn check_segment(segment: &str) -> Result<(), RouteError> {
    if segment.is_empty() {
        return Err(RouteError::Malformed("empty path segment"));
    }
    if segment.len() > MAX_SEGMENT_LEN {
        return Err(RouteError::Malformed(
            "path segment longer than 64 characters",
        ));
    }
    // The conservative charset also refuses `%` (encoded separators), `.` (`..`)
    // and anything a shell or log reader could misread.
    if !segment.bytes().all(|b| ALLOWED[usize::from(b)]) {
        return Err(RouteError::Malformed(
            "path segment has characters outside [A-Za-z0-9_-]",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRS: &str = "/v5/0123456789abcdef0123456789abcdef/jobs/62a055ae-ce03-4232-beb6-46c83b8ef2b2/export/progress";
    const ROMA: &str =
        "/v2/0123456789abcdef0123456789abcdef/instances/11111111-2222/assets/jobs/ff8080814dbd65d7";

    #[test]
    fn drs_route_is_recognised() {
        let route = parse(&Method::GET, DRS).unwrap();
        assert_eq!(route.api, Api::Drs);
        assert_eq!(route.project, "0123456789abcdef0123456789abcdef");
        assert_eq!(route.job, "62a055ae-ce03-4232-beb6-46c83b8ef2b2");
        assert_eq!(route.instance, None);
        assert_eq!(route.upstream_path(), DRS);
    }

    #[test]
    fn roma_route_is_recognised_for_head() {
        let route = parse(&Method::HEAD, ROMA).unwrap();
        assert_eq!(route.api, Api::Roma);
        assert_eq!(route.instance, Some("11111111-2222"));
        assert_eq!(route.job, "ff8080814dbd65d7");
        assert_eq!(route.upstream_path(), ROMA);
    }

    #[test]
    fn other_methods_on_known_paths_are_not_allowed() {
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert_eq!(parse(&method, DRS), Err(RouteError::MethodNotAllowed));
        }
    }

    #[test]
    fn unknown_paths_are_not_found() {
        for path in [
            "/",
            "",
            "/v5/p/jobs",
            "/v5/p/jobs/j/export/progress/extra",
            "/v3/p/jobs/j/export/progress",
            "/v2/p/instances/i/assets/jobs",
            "/v1/p/a/b/c/d/e/f/g/h/i/j",
        ] {
            assert_eq!(
                parse(&Method::GET, path),
                Err(RouteError::NotFound),
                "{path}"
            );
        }
    }

    #[test]
    fn bad_segments_are_malformed() {
        for path in [
            "/v5//jobs/j/export/progress",
            "/v5/p/jobs/../export/progress",
            "/v5/p%2Fq/jobs/j/export/progress",
            "/v5/p/jobs/j%2e/export/progress",
            "/v5/p/jobs/j/export/progress/",
            "/v2/p/instances/i;x/assets/jobs/j",
        ] {
            assert!(
                matches!(parse(&Method::GET, path), Err(RouteError::Malformed(_))),
                "{path}"
            );
        }
        let long = format!("/v5/{}/jobs/j/export/progress", "a".repeat(65));
        assert!(matches!(
            parse(&Method::GET, &long),
            Err(RouteError::Malformed(_))
        ));
        let max = format!("/v5/{}/jobs/j/export/progress", "a".repeat(64));
        assert!(parse(&Method::GET, &max).is_ok());
    }

    #[test]
    fn remembered_paths_answer_as_checked_ones() {
        for _ in 0..3 {
            let roma = parse(&Method::GET, ROMA).unwrap();
            assert_eq!(roma, checked(ROMA).unwrap());
            assert_eq!(roma.instance, Some("11111111-2222"));
            assert_eq!(parse(&Method::HEAD, DRS).unwrap(), checked(DRS).unwrap());
            // The method is checked whether the path is remembered or not.
            assert_eq!(
                parse(&Method::POST, ROMA),
                Err(RouteError::MethodNotAllowed)
            );
            // A byte changed is another path, checked afresh.
            let odd = ROMA.replace("ff80", "ff%0");
            assert!(matches!(
                parse(&Method::GET, &odd),
                Err(RouteError::Malformed(_))
            ));
            assert_eq!(
                parse(&Method::GET, "/v2/unknown"),
                Err(RouteError::NotFound)
            );
        }
    }

    #[test]
    fn segments_take_exactly_letters_digits_dash_and_underscore() {
        const SET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for c in (0..=127u8).map(char::from).chain(['é', '☃']) {
            if c == '/' {
                continue;
            }
            let path = format!("/v5/p/jobs/a{c}b/export/progress");
            assert_eq!(parse(&Method::GET, &path).is_ok(), SET.contains(c), "{c:?}");
        }
    }
}
