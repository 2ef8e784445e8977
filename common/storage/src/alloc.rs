//! The memory allocator of every process that links the servers (the
//! server binaries and `treaty`, which runs them for `treaty demo`):
//! mimalloc instead of glibc's malloc.
//!
//! A write allocates and frees many small buffers on every node (messages,
//! TLS records, sled's nodes and log buffers). With glibc's malloc that was
//! about 15% of the servers' CPU; mimalloc cut CPU per put by about 20% and
//! raised put throughput at 64 clients by about 25% (docs/decisions.md,
//! "Allocator"). The client library does not link this crate, so programs
//! using `treaty-client` keep their own allocator.
//!
//! mimalloc is built to commit its arenas on demand (`.cargo/config.toml`):
//! with its Linux default, eager commit, freed pages were never returned and
//! a participant's resident memory doubled (76 to 144 MB after 100k puts).

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
