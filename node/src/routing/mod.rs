//! Route matching and upstream clusters: the compiled [`matcher::Matcher`], clusters with
//! load balancing, retry budgets and outlier ejection ([`upstream`]), and active health
//! checks ([`health`]).

pub mod circuit;
pub mod dns;
pub mod health;
pub mod matcher;
pub mod upstream;
