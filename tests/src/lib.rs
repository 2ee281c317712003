//! End-to-end test harness for fedgate: starts real gateway processes, network namespaces and
//! real clients. The tests themselves live in `tests/tests/`.
