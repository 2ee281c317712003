//! One upstream answer through fedgate-dns's forwarder: matching it to the question asked,
//! its cache TTL, and relaying it to a client. Asserts the invariants of
//! `fedgate_dns::fixture::forward_case`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = fedgate_dns::fixture::forward_case(data) {
        panic!("forwarder invariant broken: {broken}\ninput: {data:?}");
    }
});
