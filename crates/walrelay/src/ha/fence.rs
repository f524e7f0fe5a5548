//! The fence: a small process beside the agent (`walrelay ha-fence`, which the agent starts)
//! that stops this node's PostgreSQL at once (immediate shutdown: SIGQUIT to the
//! postmaster) when the node may no longer hold the leader lease — whether the agent is
//! slow, frozen or dead.
//!
//! The agent tells it, on a pipe that is the fence's standard input, one line after every
//! renewal and whenever it starts or stops acting as the primary:
//!
//! - `arm <ms>`: this node is, or is becoming, the primary, and its lease certainly holds
//!   for `<ms>` more milliseconds; with no newer line by then, fence;
//! - `disarm`: this node is not a primary: never fence.
//!
//! The end of the pipe while armed fences at once; then the fence exits. The kernel closes
//! a process's pipes however it ends (kill -9, the OOM killer, a panic), so no PID is
//! polled (PIDs are reused) and no heartbeat file is read; the deadline covers an agent
//! that lives but cannot act (stopped, swapping, blocked). SIGINT and SIGTERM do not stop
//! the fence: meant for the agent (Ctrl-C in its terminal, systemd's stop), they would
//! otherwise take the fence away while the agent shuts PostgreSQL down.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

use crate::pg::local::postmaster_pid;

/// One line from the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Fence unless told otherwise within this long.
    Arm(Duration),
    Disarm,
}

impl Order {
    pub fn parse(line: &str) -> Option<Order> {
        match line.trim().split_once(' ') {
            Some(("arm", ms)) => ms
                .trim()
                .parse()
                .ok()
                .map(Duration::from_millis)
                .map(Order::Arm),
            None if line.trim() == "disarm" => Some(Order::Disarm),
            _ => None,
        }
    }

    pub fn line(self) -> String {
        match self {
            // Rounded down: the fence never waits longer than the agent knows is safe.
            Order::Arm(d) => format!("arm {}\n", d.as_millis()),
            Order::Disarm => "disarm\n".into(),
        }
    }
}

/// What the fence knows: while armed, the moment past which the lease may have run out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    deadline: Option<Instant>,
}

impl Guard {
    /// An order received at `now`.
    pub fn order(&mut self, order: Order, now: Instant) {
        self.deadline = match order {
            Order::Arm(d) => Some(now + d),
            Order::Disarm => None,
        };
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether to fence: armed, and past the deadline or with the agent gone.
    pub fn due(&self, now: Instant, agent_gone: bool) -> bool {
        self.deadline.is_some_and(|d| agent_gone || now >= d)
    }

    /// Fenced: disarmed until the agent arms it again.
    pub fn fenced(&mut self) {
        self.deadline = None;
    }
}

/// Immediate shutdown of the PostgreSQL in `data_dir`, if it runs: true if signalled. The
/// postmaster ends every backend at once (and kills those that linger).
pub fn stop_postgres_now(data_dir: &Path) -> bool {
    let Some(pid) = postmaster_pid(data_dir) else {
        return false;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, None).is_err() {
        return false;
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT).is_ok()
}

fn fence(data_dir: &Path, why: &str) {
    if stop_postgres_now(data_dir) {
        tracing::warn!(why, "fencing: immediate shutdown of PostgreSQL");
    }
}

/// The fence process: obey the agent's orders on standard input until it closes.
pub async fn run(data_dir: PathBuf) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut guard = Guard::default();
    tracing::debug!(data_dir = %data_dir.display(), "fence: watching");
    loop {
        let deadline = guard.deadline();
        let expired = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => match Order::parse(&line) {
                    Some(order) => guard.order(order, Instant::now()),
                    None => tracing::warn!(line, "fence: an order it does not know; ignored"),
                },
                Ok(None) | Err(_) => {
                    if guard.due(Instant::now(), true) {
                        fence(&data_dir, "the agent is gone");
                    }
                    return Ok(());
                }
            },
            _ = expired => {
                if guard.due(Instant::now(), false) {
                    fence(&data_dir, "the lease may have run out");
                    guard.fenced();
                }
            }
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    }
}

/// The agent's end of the fence: starts the process and keeps it told. Orders go out as
/// they are given, on a non-blocking pipe; a fence that died or stopped reading is
/// replaced (and told) at once.
#[derive(Debug)]
pub struct Fence {
    program: PathBuf,
    data_dir: PathBuf,
    fence_after: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    renewed: Option<Instant>,
    armed: bool,
    process: Option<(Child, ChildStdin)>,
}

impl Fence {
    /// Start the fence for the server in `data_dir`: it fences a primary whose lease was
    /// last renewed `fence_after` ago.
    pub fn start(data_dir: PathBuf, fence_after: Duration) -> std::io::Result<Fence> {
        Self::start_with(std::env::current_exe()?, data_dir, fence_after)
    }

    /// As `start`, with the `walrelay` binary to run.
    pub fn start_with(
        program: PathBuf,
        data_dir: PathBuf,
        fence_after: Duration,
    ) -> std::io::Result<Fence> {
        let fence = Fence {
            program,
            data_dir,
            fence_after,
            state: Mutex::new(State::default()),
        };
        {
            let mut state = fence.state.lock().expect("fence lock");
            state.process = Some(fence.spawn()?);
            fence.tell(&mut state);
        }
        Ok(fence)
    }

    fn spawn(&self) -> std::io::Result<(Child, ChildStdin)> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(&self.program)
            .arg("ha-fence")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Out of the agent's process group: Ctrl-C in the agent's terminal is not for it.
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        // A fence that stops reading must not stop the agent.
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        use std::os::fd::AsRawFd;
        let flags = fcntl(stdin.as_raw_fd(), FcntlArg::F_GETFL)?;
        fcntl(
            stdin.as_raw_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )?;
        tracing::debug!(pid = child.id(), "fence process started");
        Ok((child, stdin))
    }

    /// The lease was renewed (asked for at `at`).
    pub fn renewed(&self, at: Instant) {
        let mut state = self.state.lock().expect("fence lock");
        state.renewed = Some(at);
        self.tell(&mut state);
    }

    /// This node acts as the primary (or is about to), or surely not.
    pub fn arm(&self, on: bool) {
        let mut state = self.state.lock().expect("fence lock");
        state.armed = on;
        self.tell(&mut state);
    }

    fn order(&self, state: &State) -> Order {
        if !state.armed {
            return Order::Disarm;
        }
        let deadline = state.renewed.map(|t| t + self.fence_after);
        Order::Arm(deadline.map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        }))
    }

    fn tell(&self, state: &mut State) {
        let line = self.order(state).line();
        let sent = state
            .process
            .as_mut()
            .is_some_and(|(_, stdin)| stdin.write_all(line.as_bytes()).is_ok());
        if sent {
            return;
        }
        if let Some((mut child, stdin)) = state.process.take() {
            drop(stdin);
            let _ = child.kill();
            let _ = child.wait();
            tracing::error!("the fence process is gone; starting it again");
        }
        match self.spawn() {
            Ok(mut process) => {
                let line = self.order(state).line();
                if let Err(e) = process.1.write_all(line.as_bytes()) {
                    tracing::error!(error = %e, "telling the new fence process");
                }
                state.process = Some(process);
            }
            Err(e) => tracing::error!(error = %e, "cannot start the fence process"),
        }
    }
}

impl Drop for Fence {
    /// Closing the pipe ends the fence (fencing first if armed); wait a little for it.
    fn drop(&mut self) {
        let state = self.state.get_mut().expect("fence lock");
        if let Some((mut child, stdin)) = state.process.take() {
            drop(stdin);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_read_back_as_written() {
        for order in [Order::Arm(Duration::from_millis(3999)), Order::Disarm] {
            assert_eq!(Order::parse(&order.line()), Some(order));
        }
        assert_eq!(
            Order::Arm(Duration::from_micros(1999)).line(),
            "arm 1\n",
            "rounded down"
        );
        for bad in ["", "arm", "arm x", "fence", "disarm now"] {
            assert_eq!(Order::parse(bad), None, "{bad:?}");
        }
    }

    /// The process named in `postmaster.pid` gets SIGQUIT; a pid file whose process is
    /// gone is left alone.
    #[test]
    fn fencing_signals_the_postmaster_in_the_pid_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!stop_postgres_now(dir.path()), "no pid file");
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        std::fs::write(
            dir.path().join("postmaster.pid"),
            format!("{}\n{}\n", child.id(), dir.path().display()),
        )
        .unwrap();
        assert!(stop_postgres_now(dir.path()));
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(nix::libc::SIGQUIT));
        assert!(!stop_postgres_now(dir.path()), "gone already");
    }

    #[test]
    fn an_armed_fence_fires_at_its_deadline_or_when_the_agent_goes() {
        let t = Instant::now();
        let mut g = Guard::default();
        assert!(!g.due(t, true), "a disarmed fence never fires");
        g.order(Order::Arm(Duration::from_secs(4)), t);
        assert!(!g.due(t + Duration::from_millis(3999), false));
        assert!(g.due(t + Duration::from_secs(4), false));
        assert!(g.due(t, true), "the agent gone: at once");
        // Each renewal moves the deadline on.
        g.order(
            Order::Arm(Duration::from_secs(4)),
            t + Duration::from_secs(1),
        );
        assert!(!g.due(t + Duration::from_millis(4500), false));
        g.fenced();
        assert!(!g.due(t + Duration::from_secs(60), true), "fenced once");
        g.order(Order::Arm(Duration::ZERO), t);
        assert!(g.due(t, false), "armed on a lease of unknown age: at once");
        g.order(Order::Disarm, t);
        assert!(!g.due(t + Duration::from_secs(60), true));
    }
}
