//! Connections: TCP with `TCP_NODELAY`, TLS 1.3 (unless `--insecure`),
//! length-delimited frames of bincode, and the limits that keep a node alive
//! whatever arrives on its port.
//!
//! ## What a server guarantees about its port
//! * **Bounded connections.** At most `max_connections` at once (kept below
//!   the process's file-descriptor limit, so storage always has descriptors
//!   left), of which at most `max_handshakes` may still be unauthenticated.
//!   Past either, a new connection gets a one-line plain-text refusal
//!   (`treaty: ... at its connection limit ...`) and is closed. Running out
//!   of descriptors anyway (`EMFILE`) pauses accepting, is logged once per
//!   interval, and never stops the node.
//! * **Bounded time.** The first byte must arrive within the handshake
//!   timeout and the TLS handshake finish within it; a frame, once begun,
//!   must be complete within the frame timeout. EOF is seen at once.
//! * **Bounded memory.** A frame is at most [`MAX_FRAME`] bytes, and buffer
//!   space grows with the bytes that actually arrive, never with what a
//!   header announces.
//! * **Clear answers to strangers.** Bytes that are not a TLS handshake (or,
//!   in insecure mode, not a frame header) get one line of plain text saying
//!   what this port speaks, and the connection is closed.
//!
//! ## What a client learns
//! A connection that fails says why in words: the server's plain-text line
//! if it sent one, or what the TLS failure means (another cluster's CA, the
//! wrong node at an address, a node without TLS).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tarpc::client::RpcError;
use tarpc::tokio_serde::formats::Bincode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};
use crate::tls::{Expect, Identity, Security, Tls};

/// Largest frame on any connection: a 4 MiB transaction (the limit) plus
/// its encoding overhead, with room to spare.
pub const MAX_FRAME: usize = 5 * 1024 * 1024;
/// How long a new connection may take to send its first byte and finish
/// the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a frame may take from its first byte to its last. Must exceed
/// the time to send [`MAX_FRAME`] bytes on the slowest link in use.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(15);
/// Default cap on a node's connections (lowered to fit the descriptor limit).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// At most this many connections may be in their handshake at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 128;
/// File descriptors kept free for storage and outgoing connections.
const FD_RESERVE: u64 = 64;
/// How long to wait for a TCP connection to a peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Either side of a connection, TLS or plain.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type BoxIo = Box<dyn Io>;

// ---------------------------------------------------------------------------
// Framing

/// Length-delimited frames (4-byte big-endian length), at most
/// [`MAX_FRAME`], without reserving what a header announces. A reply that
/// starts with `treaty: ` is a server's plain-text line, returned as the error.
#[derive(Debug, Default)]
pub struct FrameCodec;

/// A server's plain-text refusal, read where a frame was expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServerSaid(pub String);

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<BytesMut>> {
        if src.len() < 4 {
            return Ok(None);
        }
        if src.starts_with(b"trea") {
            let line_end = src.iter().take(1024).position(|b| *b == b'\n');
            return match line_end {
                Some(end) => {
                    let line = String::from_utf8_lossy(&src[..end]).trim().to_string();
                    Err(io::Error::other(ServerSaid(line)))
                }
                None if src.len() >= 1024 => Err(io::Error::new(io::ErrorKind::InvalidData, "not Treaty RPC")),
                None => Ok(None),
            };
        }
        let len = u32::from_be_bytes(src[..4].try_into().expect("4 bytes")) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes announced; frames are 1 to {MAX_FRAME} bytes"),
            ));
        }
        if src.len() < 4 + len {
            return Ok(None);
        }
        src.advance(4);
        Ok(Some(src.split_to(len)))
    }
}

impl tokio_util::codec::Encoder<Bytes> for FrameCodec {
    type Error = io::Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> io::Result<()> {
        if item.is_empty() || item.len() > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("message of {} bytes does not fit a frame (at most {MAX_FRAME})", item.len()),
            ));
        }
        dst.reserve(4 + item.len());
        dst.put_u32(item.len() as u32);
        dst.put_slice(&item);
        Ok(())
    }
}

/// Enforces [`FRAME_TIMEOUT`] on the read side: it follows the frame
/// boundaries in the bytes passing through, and fails a read that waits
/// while a frame is incomplete past its deadline. Idle time between frames
/// is not limited.
pub struct FrameGuard<S> {
    inner: S,
    /// Header bytes seen of the current frame (0..4), then body bytes left.
    header: [u8; 4],
    header_len: usize,
    body_left: usize,
    timeout: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> FrameGuard<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        FrameGuard { inner, header: [0; 4], header_len: 0, body_left: 0, timeout, deadline: None }
    }

    fn in_frame(&self) -> bool {
        self.header_len > 0 || self.body_left > 0
    }

    fn track(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if !self.in_frame() {
                self.deadline = Some(Box::pin(tokio::time::sleep(self.timeout)));
            }
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
            } else {
                self.header[self.header_len] = bytes[0];
                self.header_len += 1;
                bytes = &bytes[1..];
                if self.header_len == 4 {
                    self.header_len = 0;
                    // A text line or an oversized header fails in the codec.
                    self.body_left = (u32::from_be_bytes(self.header) as usize).min(MAX_FRAME + 1);
                }
            }
            if !self.in_frame() {
                self.deadline = None;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.track(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut() {
                    if d.as_mut().poll(cx).is_ready() {
                        let timeout = this.timeout;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("a frame was not completed within {timeout:?}"),
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }
}

/// The write side of a read-side wrapper: straight through to `inner`.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<S: AsyncWrite + Unpin> AsyncWrite for $wrapper<S> {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write(cx, buf)
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
        }
    };
}
write_through!(FrameGuard);

/// Lets the tasks that are ready run before a connection writes, so that
/// the messages they produce leave in the same write.
///
/// tarpc writes a connection's buffered frames as soon as its task finds no
/// more queued, and tokio runs a task woken by another right after it. So
/// when a decision wakes the requests of 16 clients on one connection, the
/// connection task wakes after the first answer, writes it alone, and does
/// the same for each of the others: one `writev` (and one TLS record, one
/// wake-up of the reader) per answer. This wrapper turns the first write of
/// each flush into a yield: the task goes to the back of the run queue, the
/// other woken requests queue their answers, and the next poll writes them
/// all at once. The cost is one extra poll of the connection task per flush.
/// See docs/decisions.md, "Coalesced writes".
pub struct Coalesce<S> {
    inner: S,
    /// Yielded once since the last completed flush: write through.
    yielded: bool,
}

impl<S> Coalesce<S> {
    pub fn new(inner: S) -> Self {
        Coalesce { inner, yielded: false }
    }

    /// `Pending` once per flush (having woken this task), then `Ready`.
    fn yield_once(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.yield_once(cx));
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.yield_once(cx));
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.yielded = false;
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A tarpc transport over one connection: frames of bincode messages.
pub type Transport<In, Out> =
    tarpc::tokio_serde::Framed<tokio_util::codec::Framed<Coalesce<BoxIo>, FrameCodec>, In, Out, Bincode<In, Out>>;

/// Wraps a connection into a transport that reads `In` and writes `Out`,
/// coalescing the writes of tasks that are ready together ([`Coalesce`]).
/// (Servers have already put the connection behind a [`FrameGuard`].)
pub fn transport<In, Out>(io: BoxIo) -> Transport<In, Out> {
    let framed = tokio_util::codec::Framed::new(Coalesce::new(io), FrameCodec);
    tarpc::tokio_serde::Framed::new(framed, Bincode::default())
}

// ---------------------------------------------------------------------------
// Client side

/// Keeps the first bytes a server sends, so that a failed TLS handshake can
/// show the plain-text line the server answered with.
struct Recorder<S> {
    inner: S,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let mut seen = self.seen.lock().unwrap();
        if seen.len() < 512 {
            let new = &buf.filled()[before..];
            let take = new.len().min(512 - seen.len());
            seen.extend_from_slice(&new[..take]);
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(Recorder);

/// Turns a failed TLS handshake into what it means for the user.
fn explain_tls_failure(addr: &str, e: io::Error, server_said: &[u8]) -> String {
    if server_said.starts_with(b"treaty: ") {
        let line = server_said.split(|b| *b == b'\n').next().unwrap_or_default();
        return format!("{addr} refused the connection: {}", String::from_utf8_lossy(line));
    }
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) => format!(
            "{addr} presented a certificate from another CA: it belongs to another cluster, or --certs \
             (TREATY_CERTS) points at the wrong directory"
        ),
        Some(rustls::Error::InvalidCertificate(c)) => format!("{addr} presented an unusable certificate: {c:?}"),
        Some(rustls::Error::General(msg)) => format!("{addr}: {msg}"),
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "{addr} refused our certificate ({alert:?}): it was not issued by this cluster's CA; check --certs \
             (TREATY_CERTS)"
        ),
        Some(rustls::Error::InvalidMessage(_)) | Some(rustls::Error::InappropriateMessage { .. }) => format!(
            "{addr} does not speak TLS (was it started with --insecure?): connect with --insecure, or give it --certs"
        ),
        Some(other) => format!("TLS handshake with {addr} failed: {other}"),
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            format!("{addr} closed the connection during the TLS handshake (is it a Treaty node with TLS?)")
        }
        None => format!("TLS handshake with {addr} failed: {e}"),
    }
}

/// Why a TCP connect failed, in the words of someone running the cluster
/// rather than the socket API's ("nothing listens on ...", not "os error 111";
/// "the name does not resolve", not getaddrinfo's text, which is what a
/// stopped docker container's name produces).
fn plain_connect_error(addr: &str, e: &io::Error) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    match e.kind() {
        io::ErrorKind::ConnectionRefused => format!("nothing listens on {addr}"),
        io::ErrorKind::TimedOut => format!("no answer from {addr}"),
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable => format!("no route to {addr}"),
        _ if e.to_string().contains("lookup address") => {
            format!("the name {host} does not resolve (a stopped container's name disappears from docker's DNS)")
        }
        _ => format!("{addr}: {e}"),
    }
}

/// Opens a connection to `addr`, with TLS unless insecure, expecting `expect`.
pub async fn connect(addr: &str, security: &Security, expect: &Expect, timeout: Duration) -> io::Result<BoxIo> {
    let started = Instant::now();
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer from {addr} within {timeout:?}")))?
        .map_err(|e| io::Error::new(e.kind(), plain_connect_error(addr, &e)))?;
    stream.set_nodelay(true)?;
    match security {
        Security::Insecure => Ok(Box::new(stream)),
        Security::Tls(tls) => {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let rec = Recorder { inner: stream, seen: seen.clone() };
            // The handshake gets the connect's budget again (at least 1 s):
            // a peer that accepts TCP but cannot serve (out of descriptors)
            // is given up on quickly, and the caller tries elsewhere.
            let left = (timeout.max(Duration::from_secs(1)) * 2).saturating_sub(started.elapsed());
            match tokio::time::timeout(left, tls.connector().connect(Tls::server_name(expect), rec)).await {
                Ok(Ok(s)) => Ok(Box::new(s)),
                Ok(Err(e)) => {
                    let msg = explain_tls_failure(addr, e, &seen.lock().unwrap());
                    Err(io::Error::new(io::ErrorKind::PermissionDenied, msg))
                }
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("TLS handshake with {addr} timed out"))),
            }
        }
    }
}

/// A tarpc client type: starts on a connection, returning the client and
/// the dispatch future that drives it.
pub trait RpcClient: Clone + Send + Sync + 'static {
    fn start(io: BoxIo) -> (Self, BoxFuture<'static, std::result::Result<(), String>>);
}

/// Implements [`RpcClient`] for a tarpc-generated client type.
#[macro_export]
macro_rules! rpc_client {
    ($client:ty) => {
        impl $crate::net::RpcClient for $client {
            fn start(
                io: $crate::net::BoxIo,
            ) -> (Self, ::futures::future::BoxFuture<'static, ::std::result::Result<(), String>>) {
                use ::futures::TryFutureExt as _;
                let new = <$client>::new(::tarpc::client::Config::default(), $crate::net::transport(io));
                (new.client, Box::pin(new.dispatch.map_err(|e| $crate::net::error_chain(&e))))
            }
        }
    };
}

/// An error with every cause behind it, `outer: inner: ...`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

struct Conn<C> {
    client: C,
    /// False once the connection's dispatch has ended: nothing sent on it
    /// can arrive, so it is replaced before the next call.
    alive: Arc<AtomicBool>,
    /// Why the dispatch ended, if it failed (e.g. the server's refusal).
    why: Arc<Mutex<Option<String>>>,
    /// Set once the dispatch has ended and `why` is final.
    ended: Arc<AtomicBool>,
}

/// A lazily connected, self-healing connection to one peer. A call on a
/// broken connection reconnects once and retries, so a peer's restart costs
/// no request; a peer that stays unreachable fails fast with its name.
pub struct Peer<C> {
    /// Human name for errors, e.g. `participant 3 at 127.0.0.1:7003`.
    pub name: String,
    pub addr: String,
    security: Security,
    expect: Expect,
    slot: tokio::sync::Mutex<Option<Conn<C>>>,
    /// A hard bound on any one call, above every deadline its callers set:
    /// a connection wedged so badly that tarpc never reports the deadline
    /// (a peer that accepts bytes but never reads them) still gives up.
    max_call: Duration,
    /// With [`Peer::logging_reachability`]: since when calls have failed to
    /// reach the peer (`None`: the last call did), so that a peer going
    /// away and coming back is logged once each way, not once per call.
    down_since: Option<Mutex<Option<Instant>>>,
}

impl<C: RpcClient> Peer<C> {
    pub fn new(name: String, addr: String, security: Security, expect: Expect) -> Self {
        Peer {
            name,
            addr,
            security,
            expect,
            slot: tokio::sync::Mutex::new(None),
            max_call: Duration::from_secs(30),
            down_since: None,
        }
    }

    /// Logs when the peer stops answering (WARN, with the error) and when it
    /// answers again (INFO, with how long it was away): once per change,
    /// however many calls fail in between.
    pub fn logging_reachability(mut self) -> Self {
        self.down_since = Some(Mutex::new(None));
        self
    }

    fn reached(&self, ok: bool, error: impl FnOnce() -> String) {
        let Some(down) = &self.down_since else { return };
        let mut down = down.lock().unwrap();
        match (ok, *down) {
            (true, Some(since)) => {
                *down = None;
                tracing::info!(peer = %self.name, down_ms = since.elapsed().as_millis() as u64, "peer reachable again");
            }
            (false, None) => {
                *down = Some(Instant::now());
                tracing::warn!(peer = %self.name, error = %error(), "peer unreachable; retrying quietly until it answers");
            }
            _ => {}
        }
    }

    /// Sets the hard bound on one call (see the field's docs).
    pub fn with_max_call(mut self, max_call: Duration) -> Self {
        self.max_call = max_call;
        self
    }

    /// The live connection, opening one if needed. `Err` means nothing can
    /// have been sent.
    async fn client(&self) -> Result<(C, Arc<AtomicBool>, Arc<Mutex<Option<String>>>, Arc<AtomicBool>)> {
        let mut slot = self.slot.lock().await;
        if let Some(c) = &*slot {
            if c.alive.load(Ordering::Acquire) {
                return Ok((c.client.clone(), c.alive.clone(), c.why.clone(), c.ended.clone()));
            }
        }
        let io = connect(&self.addr, &self.security, &self.expect, CONNECT_TIMEOUT).await.map_err(|e| {
            Error::Unavailable(match e.kind() {
                io::ErrorKind::PermissionDenied => e.to_string(),
                _ => format!("{} is not running or not reachable: {e}", self.name),
            })
        })?;
        let (client, dispatch) = C::start(io);
        let alive = Arc::new(AtomicBool::new(true));
        let why = Arc::new(Mutex::new(None));
        let ended = Arc::new(AtomicBool::new(false));
        let (a, w, e2, name) = (alive.clone(), why.clone(), ended.clone(), self.name.clone());
        tokio::spawn(async move {
            if let Err(e) = dispatch.await {
                tracing::debug!(peer = %name, error = %e, "connection ended");
                *w.lock().unwrap() = Some(e);
            }
            a.store(false, Ordering::Release);
            e2.store(true, Ordering::Release);
        });
        *slot = Some(Conn { client: client.clone(), alive: alive.clone(), why: why.clone(), ended: ended.clone() });
        Ok((client, alive, why, ended))
    }

    /// Calls `f` on the connection and returns the RPC's raw answer; the
    /// error is only about reaching the peer.
    pub async fn call_raw<R, F, Fut>(&self, f: F) -> Result<R>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<R, RpcError>>,
    {
        self.call_raw_sent(f).await.0
    }

    /// Like [`Peer::call_raw`], and also whether the request may have reached
    /// the peer (`false`: no connection could be opened, nothing was sent).
    pub async fn call_raw_sent<R, F, Fut>(&self, f: F) -> (Result<R>, bool)
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<R, RpcError>>,
    {
        let (result, sent) = self.call_once_or_twice(f).await;
        self.reached(result.is_ok(), || result.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
        (result, sent)
    }

    async fn call_once_or_twice<R, F, Fut>(&self, f: F) -> (Result<R>, bool)
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<R, RpcError>>,
    {
        let mut sent = false;
        for attempt in 0..2 {
            let (c, alive, why, ended) = match self.client().await {
                Ok(c) => c,
                Err(e) => return (Err(e), sent),
            };
            sent = true;
            let result = match tokio::time::timeout(self.max_call, f(c)).await {
                Ok(r) => r,
                Err(_) => {
                    alive.store(false, Ordering::Release);
                    return (Err(rpc_error(&self.name, RpcError::DeadlineExceeded)), true);
                }
            };
            match result {
                Ok(r) => return (Ok(r), true),
                // The server answered, with an error of its own (overload,
                // an expired deadline): the connection is fine.
                Err(e @ (RpcError::DeadlineExceeded | RpcError::Server(_))) => {
                    return (Err(rpc_error(&self.name, e)), true)
                }
                Err(e) => {
                    alive.store(false, Ordering::Release);
                    // A refusal the server spelled out is final, and the
                    // server did not take the request.
                    // The dispatch notes why it ended a moment after the call fails.
                    for _ in 0..40 {
                        if ended.load(Ordering::Acquire) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let said = why.lock().unwrap().clone();
                    if let Some(said) = said.as_deref().and_then(|w| w.find("treaty: ").map(|i| &w[i..])) {
                        return (Err(Error::Unavailable(format!("{} refused the request: {said}", self.name))), false);
                    }
                    if attempt == 1 {
                        return (Err(rpc_error(&self.name, e)), true);
                    }
                    // Retry once on a fresh connection: the peer may have restarted.
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Calls `f` on the connection; the RPC's own result is flattened in.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<Result<T>, RpcError>>,
    {
        self.call_raw(f).await?
    }

    /// Like [`Peer::call`] for RPCs that cannot fail at the application level.
    pub async fn call_infallible<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(C) -> Fut,
        Fut: Future<Output = Result<T, RpcError>>,
    {
        self.call_raw(f).await
    }
}

/// A tarpc context whose deadline is `timeout` from now.
pub fn deadline(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

/// Turns a transport-level failure into an error naming the peer.
pub fn rpc_error(peer: &str, e: RpcError) -> Error {
    match e {
        RpcError::DeadlineExceeded => Error::Unavailable(format!("{peer} did not answer in time")),
        RpcError::Shutdown => {
            Error::Unavailable(format!("{peer} is not running or not reachable: the connection closed"))
        }
        RpcError::Server(e) => Error::Unavailable(format!("{peer} could not take the request: {}", e.detail)),
        other => Error::Unavailable(format!("{peer} is not running or not reachable: {other}")),
    }
}

// ---------------------------------------------------------------------------
// Server side

/// Who is calling, as far as this connection proves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Caller {
    /// Authenticated by a certificate of the cluster's CA.
    Authenticated(Identity),
    /// An insecure node does not authenticate: anyone may do anything.
    Unauthenticated,
}

impl Caller {
    /// Refuses unless the caller is the coordinator (or security is off).
    pub fn require_coordinator(&self, what: &str) -> Result<()> {
        self.require(what, "the coordinator", |id| *id == Identity::Coordinator)
    }

    /// Refuses unless the caller is a participant (or security is off), and
    /// returns its id when known.
    pub fn require_participant(&self, what: &str) -> Result<Option<u64>> {
        self.require(what, "participants", |id| matches!(id, Identity::Participant(_)))?;
        Ok(match self {
            Caller::Authenticated(Identity::Participant(id)) => Some(*id),
            _ => None,
        })
    }

    /// Refuses unless the caller is the client `admin` (or security is off).
    pub fn require_admin(&self, what: &str) -> Result<()> {
        self.require(what, "the client `admin` (its certificate client-admin.pem)", |id| {
            *id == Identity::Client(crate::tls::DEFAULT_CLIENT.into())
        })
    }

    fn require(&self, what: &str, who: &str, allowed: impl Fn(&Identity) -> bool) -> Result<()> {
        match self {
            Caller::Unauthenticated => Ok(()),
            Caller::Authenticated(id) if allowed(id) => Ok(()),
            Caller::Authenticated(id) => {
                Err(Error::Denied(format!("{what} is only for {who}; this connection is authenticated as {id}")))
            }
        }
    }
}

/// What a listening port speaks after TLS: Treaty's RPC frames, or Redis's
/// RESP (the front door of `treaty-resp`), which decides how a stranger is
/// told what the port is and whether [`FrameGuard`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Wire {
    #[default]
    Rpc,
    Resp,
}

/// Limits of one listening node (see the module docs).
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub security: Security,
    /// The protocol spoken on the port.
    pub wire: Wire,
    /// What this node is, for refusal messages (`participant 3`).
    pub role: String,
    pub max_connections: usize,
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
    /// See [`FRAME_TIMEOUT`].
    pub frame_timeout: Duration,
}

impl ServeConfig {
    pub fn new(security: Security, role: impl Into<String>) -> Self {
        ServeConfig {
            security,
            wire: Wire::Rpc,
            role: role.into(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            frame_timeout: FRAME_TIMEOUT,
        }
    }

    /// The connection cap that fits this process's descriptor limit, so
    /// that connections can never starve storage of descriptors.
    pub fn effective_max_connections(&self) -> usize {
        let soft = fd_limit();
        let fit = soft.saturating_sub(FD_RESERVE).max(8) as usize;
        self.max_connections.min(fit)
    }
}

/// The soft limit on open file descriptors.
pub fn fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

const NOT_TREATY: &str = "this port speaks Treaty's RPC protocol (TLS, then length-delimited bincode over tarpc), \
not what was sent; use the `treaty` CLI or the treaty-client library. Closing.";
const NEEDS_TLS: &str = "this node requires TLS with a certificate from its cluster's CA: pass --certs DIR \
(TREATY_CERTS) instead of --insecure. Closing.";
const NO_TLS: &str = "this node runs without TLS (it was started with --insecure): connect with --insecure. Closing.";
const RESP_NEEDS_TLS: &str = "this port requires TLS with a client certificate from the cluster's CA: \
redis-cli --tls --cacert CERTS/ca.pem --cert CERTS/client-NAME.pem --key CERTS/client-NAME.key (`treaty certs issue \
CERTS client NAME` makes one). Closing.";
const RESP_NO_TLS: &str = "this port runs without TLS (the node was started with --insecure): connect without --tls. \
Closing.";

async fn refuse(stream: TcpStream, line: String) {
    refuse_as(stream, Wire::Rpc, line).await
}

/// Tells a stranger one line in the port's own protocol, then closes.
async fn refuse_as(mut stream: TcpStream, wire: Wire, line: String) {
    let msg = match wire {
        Wire::Rpc => format!("treaty: {line}\n"),
        Wire::Resp => format!("-ERR {line}\r\n"),
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(msg.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Logs at most once per interval (for floods of the same event).
struct Throttle {
    last: Mutex<Option<Instant>>,
    every: Duration,
}

impl Throttle {
    fn new(every: Duration) -> Self {
        Throttle { last: Mutex::new(None), every }
    }

    fn ready(&self) -> bool {
        let mut last = self.last.lock().unwrap();
        if last.is_some_and(|t| t.elapsed() < self.every) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// Checks the first byte and does the handshake; returns the connection and
/// who is on it, or `None` after telling a stranger what this port is.
async fn establish(stream: TcpStream, peer: SocketAddr, cfg: &ServeConfig) -> Option<(BoxIo, Caller)> {
    let mut first = [0u8; 1];
    // peek returns as soon as one byte is there, or 0 at EOF.
    let n = match tokio::time::timeout(cfg.handshake_timeout, stream.peek(&mut first)).await {
        Ok(Ok(n)) => n,
        Ok(Err(_)) | Err(_) => return None,
    };
    if n == 0 {
        return None;
    }
    match &cfg.security {
        Security::Insecure if cfg.wire == Wire::Resp => {
            if first[0] == 0x16 {
                tracing::debug!(%peer, "closing connection: {RESP_NO_TLS}");
                refuse_as(stream, Wire::Resp, RESP_NO_TLS.into()).await;
                return None;
            }
            Some((Box::new(stream), Caller::Unauthenticated))
        }
        Security::Insecure => {
            // A frame header's first byte is 0 (frames are under 16 MiB).
            if first[0] != 0 {
                let why = if first[0] == 0x16 { NO_TLS } else { NOT_TREATY };
                tracing::debug!(%peer, "closing connection: {why}");
                refuse(stream, why.into()).await;
                return None;
            }
            Some((Box::new(stream), Caller::Unauthenticated))
        }
        Security::Tls(tls) => {
            if first[0] != 0x16 && cfg.wire == Wire::Resp {
                tracing::debug!(%peer, "closing connection: {RESP_NEEDS_TLS}");
                refuse_as(stream, Wire::Resp, RESP_NEEDS_TLS.into()).await;
                return None;
            }
            if first[0] != 0x16 {
                let why = if first[0] == 0 { NEEDS_TLS } else { NOT_TREATY };
                tracing::debug!(%peer, "closing connection: {why}");
                refuse(stream, why.into()).await;
                return None;
            }
            let accepted = tokio::time::timeout(cfg.handshake_timeout, tls.acceptor().accept(stream)).await;
            let tls_stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake refused");
                    return None;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return None;
                }
            };
            let identity = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|c| crate::tls::identity_of(c));
            let Some(identity) = identity else {
                tracing::debug!(%peer, "closing connection: the certificate names no Treaty identity");
                return None;
            };
            Some((Box::new(tls_stream), Caller::Authenticated(identity)))
        }
    }
}

/// Accepts connections until `shutdown` resolves and hands each established
/// one, with its caller, to `handle` on its own task (see the module docs
/// for the limits enforced first).
pub async fn serve<F, Fut>(listener: TcpListener, cfg: ServeConfig, handle: F, shutdown: impl Future<Output = ()>)
where
    F: Fn(BoxIo, Caller) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let max = cfg.effective_max_connections();
    if max < cfg.max_connections {
        tracing::info!(
            max_connections = max,
            fd_limit = fd_limit(),
            "connection limit lowered to fit the file-descriptor limit"
        );
    }
    let connections = Arc::new(Semaphore::new(max));
    let handshakes = Arc::new(Semaphore::new(cfg.max_handshakes.max(1)));
    let cfg = Arc::new(cfg);
    let full_log = Arc::new(Throttle::new(Duration::from_secs(10)));
    let fd_log = Throttle::new(Duration::from_secs(10));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                if fd_log.ready() {
                    if out_of_fds {
                        tracing::warn!(
                            error = %e, fd_limit = fd_limit(),
                            "out of file descriptors: not accepting new connections for now, still serving the open \
                             ones; raise the limit (ulimit -n) or lower --max-connections"
                        );
                    } else {
                        tracing::warn!(error = %e, "accept failed");
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(conn_permit) = connections.clone().try_acquire_owned() else {
            if full_log.ready() {
                tracing::warn!(%peer, max_connections = max, "connection limit reached: refusing new connections");
            }
            let line = format!(
                "{} is at its connection limit ({max}); retry later, or raise --max-connections (TREATY_MAX_CONNECTIONS)",
                cfg.role
            );
            tokio::spawn(refuse_as(stream, cfg.wire, line));
            continue;
        };
        let Ok(hs_permit) = handshakes.clone().try_acquire_owned() else {
            if full_log.ready() {
                tracing::warn!(%peer, "too many connections in their handshake: refusing new ones");
            }
            let line = "too many connections are in their handshake; retry shortly".to_string();
            tokio::spawn(refuse_as(stream, cfg.wire, line));
            continue;
        };
        let (handle, cfg) = (handle.clone(), cfg.clone());
        tokio::spawn(async move {
            let established = establish(stream, peer, &cfg).await;
            drop(hs_permit);
            if let Some((io, caller)) = established {
                // RESP connections time their own requests (see `treaty-resp`).
                let io: BoxIo = match cfg.wire {
                    Wire::Rpc => Box::new(FrameGuard::new(io, cfg.frame_timeout)),
                    Wire::Resp => io,
                };
                handle(io, caller).await;
                tracing::debug!(%peer, "connection closed");
            }
            drop(conn_permit);
        });
    }
}

/// Runs one connection's requests concurrently on `service` until it closes,
/// at most `MAX_IN_FLIGHT` at a time (more are answered with an error).
/// (A macro because tarpc's `Serve` futures are only `Send` for concrete types.)
#[macro_export]
macro_rules! execute_channel {
    ($io:expr, $service:expr) => {{
        use ::futures::StreamExt as _;
        use ::tarpc::server::Channel as _;
        ::tarpc::server::BaseChannel::with_defaults($crate::net::transport($io))
            .max_concurrent_requests($crate::net::MAX_IN_FLIGHT)
            .execute($service)
            .for_each(|fut| async move {
                ::tokio::spawn(fut);
            })
    }};
}

/// Requests one connection may have in progress at once.
pub const MAX_IN_FLIGHT: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::codec::Decoder as _;

    #[test]
    fn the_codec_neither_trusts_nor_reserves_announced_lengths() {
        let mut codec = FrameCodec;
        let mut buf = BytesMut::new();
        buf.put_u32(MAX_FRAME as u32);
        buf.put_slice(b"abc");
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() < 64 * 1024, "announced length was reserved: {}", buf.capacity());
        let mut big = BytesMut::new();
        big.put_u32(MAX_FRAME as u32 + 1);
        assert!(codec.decode(&mut big).unwrap_err().to_string().contains("announced"));
        let mut zero = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert!(codec.decode(&mut zero).is_err());
        let mut text = BytesMut::from(&b"treaty: go away\n"[..]);
        assert_eq!(codec.decode(&mut text).unwrap_err().to_string(), "treaty: go away");
        let mut ok = BytesMut::new();
        ok.put_u32(2);
        ok.put_slice(b"hi");
        assert_eq!(&codec.decode(&mut ok).unwrap().unwrap()[..], b"hi");
    }

    #[tokio::test]
    async fn connect_errors_are_in_plain_words() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let e = connect(&addr, &Security::Insecure, &Expect::AnyNode, Duration::from_secs(1)).await.err().unwrap();
        assert_eq!(e.to_string(), format!("nothing listens on {addr}"));
        // What getaddrinfo says for a stopped container's name.
        let dns = io::Error::other("failed to lookup address information: Name or service not known");
        let said = plain_connect_error("participant-3:7003", &dns);
        assert!(said.starts_with("the name participant-3 does not resolve"), "{said}");
    }

    /// A socket that counts the writes that reach it.
    struct CountWrites {
        inner: TcpStream,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsyncRead for CountWrites {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountWrites {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let r = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
            self.writes.fetch_add(1, Ordering::SeqCst);
            Poll::Ready(r)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tarpc::service]
    trait Gate {
        /// Answers `n` once the gate opens.
        async fn echo_when_open(n: u32) -> u32;
    }

    #[derive(Clone)]
    struct GateServer {
        open: tokio::sync::watch::Receiver<bool>,
        waiting: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Gate for GateServer {
        async fn echo_when_open(mut self, _: tarpc::context::Context, n: u32) -> u32 {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _ = self.open.wait_for(|open| *open).await;
            n
        }
    }

    /// One worker, as the servers run: answers that become ready together
    /// leave in one write, not one write each.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn answers_ready_together_leave_in_one_write() {
        const CALLS: u32 = 16;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open_tx, open) = tokio::sync::watch::channel(false);
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let server = GateServer { open, waiting: waiting.clone() };
        let server_writes = writes.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let io: BoxIo = Box::new(CountWrites { inner: stream, writes: server_writes });
            crate::execute_channel!(io, server.serve()).await;
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let client = GateClient::new(tarpc::client::Config::default(), transport(Box::new(stream))).spawn();
        let calls: Vec<_> = (0..CALLS)
            .map(|n| {
                let client = client.clone();
                tokio::spawn(async move { client.echo_when_open(tarpc::context::current(), n).await })
            })
            .collect();
        while waiting.load(Ordering::SeqCst) < CALLS as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Opened from a task on the worker, as a decision wakes its
        // requests in the coordinator.
        tokio::spawn(async move { open_tx.send(true).unwrap() }).await.unwrap();
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), n as u32);
        }
        let writes = writes.load(Ordering::SeqCst);
        assert!(writes <= 2, "{CALLS} answers ready together took {writes} writes");
    }

    #[tokio::test]
    async fn a_frame_that_stalls_midway_times_out_but_idle_time_does_not() {
        use tokio::io::AsyncReadExt;
        let (mut client_w, server) = tokio::io::duplex(64);
        let mut guard = FrameGuard::new(server, Duration::from_millis(100));
        // Idle for longer than the timeout, then a whole frame: fine.
        tokio::time::sleep(Duration::from_millis(150)).await;
        client_w.write_all(&[0, 0, 0, 2, b'o', b'k']).await.unwrap();
        let mut buf = [0u8; 6];
        guard.read_exact(&mut buf).await.unwrap();
        // Half a frame, then silence: the read fails.
        client_w.write_all(&[0, 0, 0, 9, b'x']).await.unwrap();
        let mut buf = [0u8; 5];
        guard.read_exact(&mut buf).await.unwrap();
        let e = guard.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
