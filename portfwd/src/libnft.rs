//! libnftables loaded into the daemon at run time (`dlopen`), so an nft
//! transaction does not spawn `nft` (~1.8 ms a spawn, ~0.05 ms in process).
//!
//! The library's own API reports every command's result:
//! `nft_run_cmd_from_buffer` returns 0 or -1 and the error text is buffered
//! in the context, so errors are per transaction, as with `nft -f -` (a
//! buffer of several commands is one atomic transaction, as a file is).
//! There is no child to lose. If the library cannot be loaded (not
//! installed, another soname), [`Libnft::load`] returns `None` and the
//! caller spawns `nft` as before.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGetBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// A libnftables context (`struct nft_ctx`) with buffered output and errors.
pub struct Libnft {
    handle: *mut c_void,
    ctx: *mut c_void,
    free: CtxFree,
    run: RunCmd,
    get_output: CtxGetBuffer,
    get_error: CtxGetBuffer,
}

impl std::fmt::Debug for Libnft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Libnft")
    }
}

/// The soname of libnftables (stable since nftables 0.9).
const SONAME: &CStr = c"libnftables.so.1";

/// Looks `name` up in `handle`.
///
/// # Safety
/// `handle` is a live `dlopen` handle and `T` is the symbol's function type.
unsafe fn sym<T: Copy>(handle: *mut c_void, name: &CStr) -> Option<T> {
    // SAFETY: per the caller; dlsym only reads the NUL-terminated name.
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: T is a function pointer type of the symbol (caller's promise).
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&p) })
}

impl Libnft {
    /// Loads the library and makes a context; `None` if either fails.
    pub fn load() -> Option<Libnft> {
        // SAFETY: dlopen of a system library by soname; its initializers run
        // once, on this (the daemon's only) thread.
        let handle = unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return None;
        }
        // SAFETY: the handle is live; the types are the C prototypes from
        // <nftables/libnftables.h>.
        let fns = unsafe {
            (|| {
                Some((
                    sym::<CtxNew>(handle, c"nft_ctx_new")?,
                    sym::<CtxFree>(handle, c"nft_ctx_free")?,
                    sym::<CtxBuffer>(handle, c"nft_ctx_buffer_output")?,
                    sym::<CtxBuffer>(handle, c"nft_ctx_buffer_error")?,
                    sym::<CtxGetBuffer>(handle, c"nft_ctx_get_output_buffer")?,
                    sym::<CtxGetBuffer>(handle, c"nft_ctx_get_error_buffer")?,
                    sym::<RunCmd>(handle, c"nft_run_cmd_from_buffer")?,
                ))
            })()
        };
        let Some((new, free, buf_out, buf_err, get_output, get_error, run)) = fns else {
            // SAFETY: nothing from the library is in use.
            unsafe { libc::dlclose(handle) };
            return None;
        };
        // SAFETY: NFT_CTX_DEFAULT (0); the context is freed in Drop.
        let ctx = unsafe { new(0) };
        if ctx.is_null() {
            // SAFETY: nothing from the library is in use.
            unsafe { libc::dlclose(handle) };
            return None;
        }
        // SAFETY: a live context. Buffering keeps nft's messages off our
        // stdout/stderr and lets us read them per command.
        let buffered = unsafe { buf_out(ctx) == 0 && buf_err(ctx) == 0 };
        let lib = Libnft {
            handle,
            ctx,
            free,
            run,
            get_output,
            get_error,
        };
        buffered.then_some(lib)
    }

    /// Runs `script` (nft syntax, one transaction) and returns the error
    /// text on failure. Buffers are drained after every run.
    pub fn run(&mut self, script: &str) -> Result<(), String> {
        let script = CString::new(script).map_err(|_| "NUL byte in the nft script".to_owned())?;
        // SAFETY: a live context and a NUL-terminated buffer that outlives
        // the call; single-threaded use (&mut self).
        let rc = unsafe { (self.run)(self.ctx, script.as_ptr()) };
        // SAFETY: the buffers belong to the context and are valid until the
        // next call on it; we copy them at once. Reading also resets them.
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: a NUL-terminated buffer owned by the context,
                // valid until its next call; copied at once.
                unsafe { CStr::from_ptr(p) }
                    .to_string_lossy()
                    .trim()
                    .to_owned()
            }
        };
        // SAFETY: a live context. Reading a buffer also resets it.
        let _ = text(unsafe { (self.get_output)(self.ctx) });
        let err = text(unsafe { (self.get_error)(self.ctx) });
        if rc == 0 {
            Ok(())
        } else if err.is_empty() {
            Err(format!("libnftables: command failed ({rc})"))
        } else {
            Err(err)
        }
    }
}

impl Drop for Libnft {
    fn drop(&mut self) {
        // SAFETY: the context is ours and no longer used; the handle was
        // opened by us.
        unsafe {
            (self.free)(self.ctx);
            libc::dlclose(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_per_command() {
        let Some(mut lib) = Libnft::load() else {
            eprintln!("libnftables.so.1 not loadable here: nothing to test");
            return;
        };
        // Syntax errors fail in the parser: the kernel is never asked.
        let e = lib.run("add elemnt ip t m { 1 }\n").unwrap_err();
        assert!(e.contains("syntax error") && e.contains("elemnt"), "{e}");
        let e = lib.run("delete tabel ip x\n").unwrap_err();
        assert!(e.contains("tabel") && !e.contains("elemnt"), "drained: {e}");
        assert!(lib.run("a\0b").is_err());
    }
}
