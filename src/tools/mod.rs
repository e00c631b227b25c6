//! Tools around the gateway, not the gateway itself: the [`simulator`] of
//! both upstream APIs (tests, the demo, benchmarks) and the [`demo`]. Behind
//! the default-on `tools` feature, so a production build can leave them out.
//!
//! [`SimFront`] writes the config of "a gateway in front of the simulator"
//! that tests, benchmarks and the demo start through [`crate::app`].

pub mod demo;
pub mod simulator;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError};

/// The project the simulator fronts by default.
pub const PROJECT: &str = "0123456789abcdef0123456789abcdef";

/// A gateway config in front of a simulator: listeners on port 0, both APIs
/// at the simulator, and `[credentials.main]` a token file unless replaced.
#[derive(Debug, Clone)]
pub struct SimFront {
    sim: SocketAddr,
    /// Where the region points: the simulator unless replaced.
    region: Option<String>,
    token_file: PathBuf,
    listen: String,
    admin: String,
    sections: Vec<String>,
    credential: Option<String>,
    /// (project, credential name); `main` and `second` are defined.
    projects: Vec<(String, String)>,
}

impl SimFront {
    /// One project, [`PROJECT`], with a token read from `token_file`.
    pub fn new(sim: SocketAddr, token_file: &Path) -> Self {
        SimFront {
            sim,
            region: None,
            token_file: token_file.to_path_buf(),
            listen: "127.0.0.1:0".into(),
            admin: "127.0.0.1:0".into(),
            sections: Vec::new(),
            credential: None,
            projects: vec![(PROJECT.into(), "main".into())],
        }
    }

    /// The proxy's `listen` (default `127.0.0.1:0`).
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = addr.into();
        self
    }

    /// `[admin] listen`; `""` turns the admin listener off.
    pub fn admin(mut self, addr: &str) -> Self {
        self.admin = addr.into();
        self
    }

    /// Points both APIs at `url` instead of the simulator.
    pub fn region(mut self, url: &str) -> Self {
        self.region = Some(url.into());
        self
    }

    /// Extra TOML tables (`[cache]`, `[upstream]`, ...).
    pub fn section(mut self, toml: &str) -> Self {
        self.sections.push(toml.into());
        self
    }

    /// The body of `[credentials.main]` in place of the token file.
    pub fn credential(mut self, body: &str) -> Self {
        self.credential = Some(body.into());
        self
    }

    /// Another served project using credential `main` or `second` (a token
    /// from the same file).
    pub fn project(mut self, id: &str, credential: &str) -> Self {
        self.projects.push((id.into(), credential.into()));
        self
    }

    /// No projects but those added with [`SimFront::project`].
    pub fn without_projects(mut self) -> Self {
        self.projects.clear();
        self
    }

    pub fn toml(&self) -> String {
        let token = self.token_file.display();
        let url = self
            .region
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.sim));
        let mut text = format!(
            "listen = \"{}\"\n\n[admin]\nlisten = \"{}\"\n\n",
            self.listen, self.admin
        );
        for section in &self.sections {
            text.push_str(section);
            text.push_str("\n\n");
        }
        let main = self
            .credential
            .clone()
            .unwrap_or_else(|| format!("kind = \"token\"\ntoken_file = \"{token}\""));
        text.push_str(&format!(
            "[regions.sim]\ndrs = \"{url}\"\nroma = \"{url}\"\n\n\
             [credentials.main]\n{main}\n\n\
             [credentials.second]\nkind = \"token\"\ntoken_file = \"{token}\"\n"
        ));
        for (id, credential) in &self.projects {
            text.push_str(&format!(
                "\n[[projects]]\nid = \"{id}\"\nregion = \"sim\"\ncredential = \"{credential}\"\n"
            ));
        }
        text
    }

    pub fn config(&self) -> Result<Config, ConfigError> {
        Config::parse(&self.toml())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_config_is_valid_and_holds_what_was_added() {
        let sim: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let config = SimFront::new(sim, Path::new("/tmp/t"))
            .admin("")
            .section("[cache]\nrunning_ttl = \"2s\"")
            .project("other", "second")
            .config()
            .unwrap();
        assert_eq!(config.admin, None);
        assert_eq!(config.cache.running_ttl, std::time::Duration::from_secs(2));
        assert_eq!(config.projects["other"].credential, "second");
        assert_eq!(config.projects[PROJECT].drs, "http://127.0.0.1:9");
    }
}
