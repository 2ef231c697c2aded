//! Linear-logistic scoring with per-feature contributions, and the weights file that carries the learned
//! coefficients and the calibrated policy thresholds (`model/weights.toml`, embedded as the default).
//!
//! score = σ(bias + Σ wᵢ·xᵢ); the contribution of feature i is wᵢ·xᵢ (in log-odds).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::features::{GROUP_FEATURES, NG, NS, SOURCE_FEATURES};
use super::policy::PolicyConfig;

/// The shipped model: trained by `cargo xtask eval --train` on `scenarios/train/`.
pub const DEFAULT_WEIGHTS: &str = include_str!("weights.toml");

/// Errors loading a weights file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot parse weights file")]
    Parse(#[source] toml::de::Error),
    #[error("unknown {scope} feature {name:?} in weights file (known: {known})")]
    UnknownFeature {
        scope: &'static str,
        name: String,
        known: String,
    },
    #[error("unsupported weights file version {version}, expected 1")]
    Version { version: u32 },
}

/// One linear model as written in the weights file: bias and named weights (missing names weigh 0).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearSpec {
    pub bias: f32,
    pub weights: BTreeMap<String, f32>,
}

/// The weights file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsFile {
    pub version: u32,
    /// Free text: how and on what it was trained.
    #[serde(default)]
    pub note: String,
    pub source: LinearSpec,
    pub fingerprint: LinearSpec,
    pub prefix: LinearSpec,
    #[serde(default)]
    pub policy: PolicyConfig,
}

impl WeightsFile {
    pub fn parse(text: &str) -> Result<Self, WeightsError> {
        let w: WeightsFile = toml::from_str(text).map_err(WeightsError::Parse)?;
        if w.version != 1 {
            return Err(WeightsError::Version { version: w.version });
        }
        Ok(w)
    }

    pub fn shipped() -> Self {
        Self::parse(DEFAULT_WEIGHTS).expect("the shipped weights file parses (checked by a unit test)")
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("weights serialise")
    }

    pub(crate) fn compile(&self) -> Result<Compiled, WeightsError> {
        Ok(Compiled {
            source: Linear::compile("source", &self.source, &SOURCE_FEATURES)?,
            fingerprint: Linear::compile("fingerprint", &self.fingerprint, &GROUP_FEATURES)?,
            prefix: Linear::compile("prefix", &self.prefix, &GROUP_FEATURES)?,
        })
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Compiled {
    pub source: Linear<NS>,
    pub fingerprint: Linear<NG>,
    pub prefix: Linear<NG>,
}

#[derive(Clone, Debug)]
pub(crate) struct Linear<const N: usize> {
    pub bias: f32,
    pub w: [f32; N],
}

impl<const N: usize> Linear<N> {
    fn compile(scope: &'static str, spec: &LinearSpec, names: &[&str; N]) -> Result<Self, WeightsError> {
        let mut w = [0.0; N];
        for (name, &v) in &spec.weights {
            let i = names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| WeightsError::UnknownFeature {
                    scope,
                    name: name.clone(),
                    known: names.join(", "),
                })?;
            w[i] = v;
        }
        Ok(Linear { bias: spec.bias, w })
    }

    #[inline]
    #[expect(
        clippy::needless_range_loop,
        reason = "a fixed-size dot product the compiler unrolls"
    )]
    pub(crate) fn logit(&self, x: &[f32; N]) -> f32 {
        let mut z = self.bias;
        for i in 0..N {
            z += self.w[i] * x[i];
        }
        z
    }

    #[inline]
    pub(crate) fn score(&self, x: &[f32; N]) -> f32 {
        sigmoid(self.logit(x))
    }
}

#[inline]
pub(crate) fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// One feature's part in a score.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Contribution {
    pub feature: String,
    pub value: f64,
    pub weight: f64,
    /// weight × value, in log-odds.
    pub contribution: f64,
}

pub(crate) fn contributions<const N: usize>(
    lin: &Linear<N>,
    x: &[f32; N],
    names: &[&str; N],
) -> Vec<Contribution> {
    let mut v: Vec<Contribution> = (0..N)
        .map(|i| Contribution {
            feature: names[i].to_string(),
            value: x[i] as f64,
            weight: lin.w[i] as f64,
            contribution: (lin.w[i] * x[i]) as f64,
        })
        .collect();
    v.sort_by(|a, b| b.contribution.abs().total_cmp(&a.contribution.abs()));
    v
}

/// "fp_cluster +3.1, regularity +1.2": the largest positive contributions, for a decision's reason.
pub(crate) fn top_reasons<const N: usize>(
    lin: &Linear<N>,
    x: &[f32; N],
    names: &[&str; N],
    k: usize,
) -> String {
    let mut v: Vec<(f32, &str)> = (0..N)
        .map(|i| (lin.w[i] * x[i], names[i]))
        .filter(|c| c.0 > 0.05)
        .collect();
    v.sort_by(|a, b| b.0.total_cmp(&a.0));
    v.iter()
        .take(k)
        .map(|(c, n)| format!("{n} +{c:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}
