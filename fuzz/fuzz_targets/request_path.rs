//! One UDP datagram through fedgate-dns's request path (fast path over pre-encoded answers,
//! hickory slow path behind it) over a zone with ClusterSetIP and headless services. Asserts
//! the invariants of `fedgate_dns::path::check_udp_answer` and that the fast and slow paths
//! agree, not merely that nothing panics.
#![no_main]

use std::sync::OnceLock;

use fedgate_dns::fixture::{request_path, request_path_case};
use fedgate_dns::path::RequestPath;
use libfuzzer_sys::fuzz_target;

struct State {
    runtime: tokio::runtime::Runtime,
    path: RequestPath,
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| State {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread tokio runtime"),
        path: request_path(),
    })
}

fuzz_target!(|data: &[u8]| {
    let s = state();
    if let Err(broken) = s.runtime.block_on(request_path_case(&s.path, data)) {
        panic!("request path invariant broken: {broken}\ninput: {data:?}");
    }
});
