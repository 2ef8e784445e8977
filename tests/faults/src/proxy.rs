//! A fault-injecting TCP proxy on loopback. In `Pass` mode it forwards
//! bytes both ways; `Drop` closes every connection and refuses new ones
//! (a peer that is gone); `Blackhole` holds connections open and forwards
//! nothing (packets lost: the sender only learns by timing out).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass = 0,
    Drop = 1,
    Blackhole = 2,
}

/// A running proxy. Dropping it stops accepting.
pub struct Proxy {
    pub addr: String,
    mode: Arc<AtomicU8>,
    /// Bumped on every mode change: live connections made in an earlier
    /// generation are cut.
    generation: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let generation = Arc::new(AtomicU64::new(0));
        let (m, g) = (mode.clone(), generation.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                let _ = inbound.set_nodelay(true);
                let (m, g, target) = (m.clone(), g.clone(), target.clone());
                tokio::spawn(async move {
                    match m.load(Ordering::Acquire) {
                        1 => drop(inbound),
                        2 => {
                            // Hold it silently until the mode changes.
                            let born = g.load(Ordering::Acquire);
                            while g.load(Ordering::Acquire) == born {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            drop(inbound);
                        }
                        _ => {
                            let Ok(outbound) = TcpStream::connect(&target).await else { return };
                            let _ = outbound.set_nodelay(true);
                            pipe(inbound, outbound, g).await;
                        }
                    }
                });
            }
        });
        Proxy { addr, mode, generation, task }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until either side closes or the generation changes.
async fn pipe(a: TcpStream, b: TcpStream, generation: Arc<AtomicU64>) {
    let born = generation.load(Ordering::Acquire);
    let (ar, aw) = a.into_split();
    let (br, bw) = b.into_split();
    let watch = async {
        while generation.load(Ordering::Acquire) == born {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = copy(ar, bw) => {}
        _ = copy(br, aw) => {}
        _ = watch => {}
    }
}

async fn copy(mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
