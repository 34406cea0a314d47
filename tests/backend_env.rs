//! `IOENGINE_BACKEND` overrides the backend an application asks for. This
//! test has its own binary because it changes the process environment.

use ioengine::{uring_supported, Backend, ClosureCb, ContextOptions, IOContext, IOWorkers, BACKEND_ENV};

#[test]
fn environment_variable_selects_the_backend() {
    let workers = IOWorkers::<ClosureCb>::new(0).unwrap();
    let open = |requested: Backend| {
        IOContext::with_options(&ContextOptions { backend: requested, ..ContextOptions::with_depth(4) }, &workers)
    };

    std::env::remove_var(BACKEND_ENV);
    let uring = uring_supported();
    let auto = if uring { Backend::Uring } else { Backend::Aio };
    if !uring {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIP the io_uring cases: io_uring is not available here");
    }
    assert_eq!(open(Backend::Auto).unwrap().backend(), auto);
    assert_eq!(open(Backend::Aio).unwrap().backend(), Backend::Aio);

    std::env::set_var(BACKEND_ENV, "aio");
    assert_eq!(open(Backend::Auto).unwrap().backend(), Backend::Aio);
    assert_eq!(open(Backend::Uring).unwrap().backend(), Backend::Aio);

    std::env::set_var(BACKEND_ENV, "uring");
    match open(Backend::Aio) {
        Ok(ctx) => assert_eq!(ctx.backend(), Backend::Uring),
        Err(e) => assert!(!uring, "io_uring forced and available, yet: {e}"),
    }

    std::env::set_var(BACKEND_ENV, "auto");
    assert_eq!(open(Backend::Aio).unwrap().backend(), auto);

    std::env::set_var(BACKEND_ENV, "bogus");
    assert_eq!(open(Backend::Auto).err().unwrap().raw_os_error(), Some(libc::EINVAL));

    std::env::remove_var(BACKEND_ENV);
}
