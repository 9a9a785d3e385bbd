//! # libgcb.so — socket interposition for GCB and DPF
//!
//! Loaded with `LD_PRELOAD` into an unmodified program, this library defines the libc
//! socket, descriptor, readiness, fork and exec functions, so the dynamic linker binds the
//! program's calls to us first; we reach the real libc function with
//! `dlsym(RTLD_NEXT, ...)`. With no broker (`GCB_BROKER`) and no DPF server
//! (`GCB_DPF_SERVER`) it is a transparent pass-through and changes nothing. With them, the
//! installed layer ([`stack`]) runs the paper's clients: [`dpf`] installs a port-forwarding
//! rule for a bound socket, and [`gcb`] registers listening sockets with the broker,
//! brokers connects to proxy addresses and runs the asynchronous event handler inside the
//! program's blocking calls. Control datagrams are authenticated with the pool key
//! (`GCB_KEY_FILE`); see `docs/THREAT-MODEL.md` for what that protects.
//!
//! ## Floors
//!
//! The modules form floors: each uses only modules on its own floor or below, and no two
//! modules use each other, directly or around a loop. `scripts/modgraph --check shim/src`
//! checks both against the list below (the list is the checker's input). Read the crate
//! from the bottom up.
//!
//! - **Floor 0, the system**: `real`, `sys`, `log`, `guard`, `forklock`, `procid`, `abi`, `ownfd`, `inherit`, `sockaddr`, `conf`
//! - **Floor 1, the fd table**: `net`, `sockstate`, `fdtable`
//! - **Floor 2, plumbing**: `layer`, `control`, `fork`
//! - **Floor 3, the clients**: `dpf`, `gcb` (independent)
//! - **Floor 4, composition**: `stack`, `init`, `check`
//! - **Floor 5, the entry points**: `hooks`
//!
//! * Floor 0: [`real`]/[`sys`] resolve and call the real libc functions
//!   (`dlsym(RTLD_NEXT)`); [`log`] is the async-signal-safe logger (notices of
//!   misconfiguration once per process by default, the rest only with `GCB_LOG`; never
//!   stdout); [`conf`] parses the config file (`/etc/gcb/gcb.conf`, `GCB_CONF`); [`guard`] is the thread-local re-entrancy guard; [`forklock`]
//!   the locks a fork child can re-initialise; [`procid`] which process this memory
//!   belongs to (vfork children) and which sockets other processes hold; [`abi`] the
//!   descriptions of intercepted calls and their [`abi::Outcome`] (`Bypass(reason)`,
//!   `Handled(ret)`, `Error(errno)`); [`ownfd`] the shim's own fds, closed exactly once.
//! * Floor 1: [`net`] address conversion and bounded socket operations; [`sockstate`] the
//!   state machine of one managed socket ([`sockstate::SockState`]: plain, GCB listener or
//!   accepted connection, UDP pending/registering/registered, DPF pending/mapped);
//!   [`fdtable`] the per-fd table (lock-free "is this fd managed?", entries shared by dup'd
//!   fds, shim-owned fds protected from the program).
//! * Floor 2: [`layer`] the [`layer::Layer`] trait and the installed layer; [`control`] a
//!   control channel to a daemon (UDP + the sans-IO reliable-UDP endpoint of `gcb-proto`);
//!   [`fork`] the pthread_atfork handlers.
//! * Floor 3: [`dpf`] the DPF client (paper 3.2.1) and [`gcb`] the GCB client (paper
//!   4.2.1), each a [`layer::Layer`]; neither uses the other.
//! * Floor 4: [`stack`] the installed layer (DPF where it can map, GCB for the rest);
//!   [`init`] configuration from the environment and the config file, and lazy
//!   initialisation; [`check`] the `GCB_CHECK` probe of the configured daemons
//!   (`gcb-run --check`).
//! * Floor 5: [`hooks`] the exported `extern "C"` functions.
//!
//! ## One call, end to end: `recv(fd, buf, len, flags)`
//!
//! 1. The program calls `recv`; the dynamic linker resolved that symbol to
//!    [`hooks::io::recv`] because LD_PRELOAD objects come first in the lookup scope.
//! 2. Fast path: [`fdtable::is_marked`]`(fd)`: one Acquire load of the chunk pointer
//!    covering `fd` (null when the shim manages nothing), at most one more Relaxed load of
//!    the slot. Not managed: a tail call of the real `recv` through [`sys`]'s cached
//!    pointer (resolved once with `dlsym(RTLD_NEXT, "recv")`). This is the whole cost for
//!    ordinary sockets: no lock, no allocation, no syscall of our own.
//! 3. Managed fd: [`hooks::run`] enters the [`guard`] (if this thread is already inside
//!    the shim, e.g. the shim's own management traffic, it calls the real function
//!    instead), ensures [`init`] ran, and calls the safe logic under `catch_unwind`.
//! 4. The logic clones the fd's `Arc<FdEntry>` under the table's read lock. A shim-owned fd
//!    gives `Error(EBADF)` (the program never received that fd); a managed socket asks the
//!    active [`layer::Layer::on_io`], which answers `Bypass(why)`, `Handled(n)` or
//!    `Error(e)`.
//! 5. [`hooks::finish`] turns the outcome into the C result: `Bypass` calls the real
//!    function (after leaving the guard; the reason is traced), `Handled(n)` returns `n`,
//!    `Error(e)` sets errno (the only place errno is set) and returns -1. A panic anywhere
//!    in steps 3-4 is logged once (panic hook) and becomes `Bypass`; no panic crosses the
//!    FFI boundary.
//!
//! Every hooked symbol has this shape, written once in the [`hook!`] macro (see
//! [`hooks`]).
//!
//! ## Fork and exec
//!
//! pthread_atfork handlers take the table lock and every entry lock before fork and
//! re-initialise them in the child. vfork/posix_spawn children share our memory and run no
//! handlers; hooks detect them by pid and never mutate the table there. exec is
//! pass-through except that, just before it, the layers write `GCB_INHERIT`: the
//! registered sockets that survive the exec (no close-on-exec) — GCB's TCP listeners and
//! UDP sockets with their proxies, UDP tokens and channels, DPF's mappings — which the
//! new image's shim adopts at load after checking that each fd still is that socket (see
//! [`inherit`], [`dpf`]). `execl*` are variadic and reach the kernel through glibc
//! internals, so they are not seen (see [`hooks::process`]).
//!
//! ## Initialisation
//!
//! An `.init_array` constructor runs [`init::ensure`] when the library is loaded (before the
//! program's own constructors); any hook that needs configuration also calls it, so the
//! order does not matter. It reads the environment with libc `getenv`, so it needs nothing
//! from Rust's runtime start-up.
//!
//! Environment (each also a key of the config file `/etc/gcb/gcb.conf` or `$GCB_CONF`,
//! in lower case without `GCB_`; the environment wins): `GCB_LOG=off|error|warn|info|debug|trace`
//! (unset: only the one-line notices of misconfiguration), `GCB_LOG_FILE=path`,
//! `GCB_BROKER=IP[:PORT]` (enables the [`gcb`] layer; a pool: `IP[:PORT],IP[:PORT],...` or
//! one DNS name, see `gcb::client::failover`), `GCB_KEY_FILE=path` (pool key),
//! `GCB_HEARTBEAT_MS` (heartbeat interval, default 10000), `GCB_STANDBY=0` (no standby relay
//! connections, see `gcb::standby`), `GCB_PUNCH_TCP=0` (no TCP hole punching, see
//! `gcb::tcp_punch`), `GCB_PUNCH_MS` (how long a punch may take, default 200), `GCB_DPF_REFRESH_MS` (how often
//! a process checks that portfwd still has its mappings, default 30000),
//! `GCB_DPF_SERVER=IP[:PORT]` (enables the [`dpf`] client; with both set, [`stack`] lets DPF
//! serve the sockets it can and GCB the rest).

pub mod abi;
pub mod check;
pub mod conf;
pub mod control;
pub mod dpf;
pub mod fdtable;
pub mod fork;
pub mod forklock;
pub mod gcb;
pub mod guard;
pub mod hooks;
pub mod inherit;
pub mod init;
pub mod layer;
pub mod net;
pub mod ownfd;
#[macro_use]
pub mod log;
pub mod procid;
pub mod real;
pub mod sockaddr;
pub mod sockstate;
pub mod stack;
pub mod sys;

extern "C" fn gcb_constructor() {
    let _ = std::panic::catch_unwind(init::ensure);
}

/// Runs [`gcb_constructor`] at load time, like `__attribute__((constructor))`.
#[used]
#[link_section = ".init_array"]
static GCB_CONSTRUCTOR: extern "C" fn() = gcb_constructor;
