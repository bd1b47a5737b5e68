//! Canary rollouts judged where the traffic is (docs/hypercare.md).

pub mod sprt;
