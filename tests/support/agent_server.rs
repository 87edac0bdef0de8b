//! The real guest agent's server run in this process over Unix socket pairs, with its privileged
//! calls recorded instead of made (this host's RNG and clock are left alone), and a client
//! connected to it: for the agent tests (`agent.rs`, `agent_memory.rs`) and the agent bench.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use forkvm_agent::server::{Agent as AgentServer, Config, serve_connection};
use forkvm_agent::system::System;
use forkvm_agent_client::{Agent, Connector};
use forkvm_agent_protocol::PowerAction;

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// What the agent was asked to do with the (fake) system.
#[derive(Default)]
pub struct Calls {
    pub entropy: Vec<usize>,
    pub clock: Vec<u64>,
}

pub struct Recorder(pub Arc<Mutex<Calls>>);

impl System for Recorder {
    fn add_entropy(&self, entropy: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().entropy.push(entropy.len());
        Ok(())
    }
    fn reseed_crng(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_clock(&self, time_ns: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().clock.push(time_ns);
        Ok(())
    }
    fn power(&self, _: PowerAction) -> std::io::Result<()> {
        Ok(())
    }
}

/// An agent server and a connector that opens connections to it.
pub fn agent_server() -> (Connector, Arc<Mutex<Calls>>) {
    let calls = Arc::new(Mutex::new(Calls::default()));
    let server = AgentServer::new(Config {
        system: Box::new(Recorder(calls.clone())),
        reap_all: false,
        allow_shutdown: false,
    });
    let connector: Connector = Arc::new(move |_| {
        let (ours, theirs) = UnixStream::pair()?;
        let server = server.clone();
        std::thread::spawn(move || serve_connection(server, theirs));
        Ok(ours)
    });
    (connector, calls)
}

pub fn agent() -> Agent {
    Agent::connect(agent_server().0, 3, TIMEOUT).unwrap()
}
