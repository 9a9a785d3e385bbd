//! Build script: the git commit this was built from, for `--version` (`GCB_GIT_COMMIT`,
//! "unknown" outside a git checkout or without git). Reruns when HEAD or its branch moves
//! (and, as every build script, when it changes). brokerd, portfwd and examples use this
//! same file (`build = "../shim/build.rs"`).

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    let commit = git(&["rev-parse", "--short=7", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=GCB_GIT_COMMIT={commit}");
    // Only files that exist: a missing one would rerun this script on every build.
    let watch = |p: String| {
        if Path::new(&p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    };
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        watch(format!("{dir}/HEAD"));
    }
    let common = git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]);
    if let (Some(common), Some(branch)) = (common, git(&["symbolic-ref", "-q", "HEAD"])) {
        watch(format!("{common}/{branch}"));
        watch(format!("{common}/packed-refs"));
    }
}
