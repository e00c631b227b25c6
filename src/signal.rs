//! Process signals as lifecycle events: SIGHUP reloads, SIGTERM or SIGINT stops.

use tokio::signal::unix::{signal, Signal as Stream, SignalKind};

/// What a signal asks of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGHUP: re-read the config file and TLS files.
    Reload,
    /// SIGTERM or SIGINT: stop accepting and drain.
    Stop,
}

/// The signals the gateway listens for, installed once.
#[derive(Debug)]
pub struct Signals {
    hangup: Stream,
    terminate: Stream,
    interrupt: Stream,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.hangup.recv() => Signal::Reload,
            _ = self.terminate.recv() => Signal::Stop,
            _ = self.interrupt.recv() => Signal::Stop,
        }
    }
}
