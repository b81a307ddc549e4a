//! Throttle curves: pure functions from replication pressure in `[0, 1]` to a vCPU throttle fraction in
//! `[0, max]` (the fraction of every time slice the vCPUs sleep; at most [`MAX_THROTTLE`]).
//!
//! Pressure says how hard the guest pushes against replication: 0 when the paths drain everything with
//! room to spare, 1 when the staging buffer is full. The sidecar's controller computes it; a curve only
//! says how much to slow the guest for it. No I/O, no clock, no state.
//!
//! | curve | string form | shape |
//! |---|---|---|
//! | [`Curve::Linear`] | `linear:start=0.5,max=0.9` | 0 up to `start`, then a straight line to `max` at pressure 1 |
//! | [`Curve::Exponential`] | `exponential:start=0.3,max=0.95,steepness=4` | 0 up to `start`, then `max * (e^(k x) - 1) / (e^k - 1)` with `x` rising from 0 to 1: gentle first, steep near 1 |
//! | [`Curve::Step`] | `step:start=0.5,initial=0.2,increment=0.1,max=0.99[,tailslow=true]` | QEMU auto-converge's ladder: 20 % at the first step, +10 % a step, capped at 99 %; steps evenly spaced over `[start, 1]` |
//! | [`Curve::Piecewise`] | `points:0.5=0,0.8=0.3,1=0.9` | straight lines between operator-given `(pressure, throttle)` points |
//!
//! The same curves read from TOML (feature `toml`): `kind = "linear"` with the same keys, or just
//! `points = [[0.5, 0.0], [0.8, 0.3], [1.0, 0.9]]`.
//!
//! ```
//! use throttle_curves::Curve;
//!
//! let c: Curve = "linear:start=0.5,max=0.9".parse().unwrap();
//! assert_eq!(c.throttle(0.25), 0.0); // below start: no throttle
//! assert!((c.throttle(0.75) - 0.45).abs() < 1e-12);
//! assert!("points:0.5=0.4,0.8=0.3".parse::<Curve>().unwrap_err().to_string().contains("must not decrease"));
//! ```
//!
//! QEMU's auto-converge (`migration/ram.c`, `mig_throttle_guest_down`) raises the throttle by
//! `cpu-throttle-increment` each time a pass dirties more than half of what it sent; its `tail-slow` option
//! instead raises it only as far as the dirty rate says is needed, so the last steps are smaller. As a
//! curve of pressure, [`Curve::Step`] is that ladder, and `tailslow` makes each step at most half of what
//! remains below `max`.

use std::fmt;

/// The largest throttle a curve may ask for: the vCPUs must run some of the time.
pub const MAX_THROTTLE: f64 = 0.99;

/// Why a curve was refused. Each message names the parameter and what was wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CurveError {
    /// The text names no curve.
    #[error("unknown curve {0:?} (linear, exponential, step, points)")]
    UnknownKind(String),
    /// A `key=value` that does not parse or that this curve does not take.
    #[error("curve {kind}: {param:?}: {why}")]
    BadParam {
        /// Curve kind.
        kind: &'static str,
        /// The offending `key=value`.
        param: String,
        /// What is wrong.
        why: String,
    },
    /// A value outside its range.
    #[error("curve {kind}: {name} = {value} is outside {range}")]
    OutOfRange {
        /// Curve kind.
        kind: &'static str,
        /// Parameter name.
        name: &'static str,
        /// The value given.
        value: f64,
        /// The allowed range, as text.
        range: &'static str,
    },
    /// Piecewise points whose pressures do not strictly increase.
    #[error(
        "curve points: pressures must strictly increase, but point {index} ({x}) follows {prev}"
    )]
    PressureNotIncreasing {
        /// Index of the offending point.
        index: usize,
        /// Its pressure.
        x: f64,
        /// The previous point's pressure.
        prev: f64,
    },
    /// Piecewise points whose throttle goes down: a curve must never slow the guest less as pressure rises.
    #[error("curve points: throttle must not decrease, but point {index} ({y}) follows {prev}")]
    ThrottleDecreasing {
        /// Index of the offending point.
        index: usize,
        /// Its throttle.
        y: f64,
        /// The previous point's throttle.
        prev: f64,
    },
    /// Fewer than two points.
    #[error("curve points: need at least 2 points, got {0}")]
    TooFewPoints(usize),
    /// The TOML could not be read.
    #[error("curve TOML: {0}")]
    Toml(String),
}

/// A throttle curve. Build one with [`Curve::parse`], a constructor, or (feature `toml`) [`Curve::from_toml`];
/// all of them validate.
#[derive(Debug, Clone, PartialEq)]
pub enum Curve {
    /// 0 below `start`, then linear up to `max` at pressure 1. Continuous.
    Linear {
        /// Pressure where throttling begins, `[0, 1)`.
        start: f64,
        /// Throttle at pressure 1, `[0, MAX_THROTTLE]`.
        max: f64,
    },
    /// 0 below `start`, then `max * (e^(k x) - 1) / (e^k - 1)`, `x = (p - start) / (1 - start)`. Continuous.
    Exponential {
        /// Pressure where throttling begins, `[0, 1)`.
        start: f64,
        /// Throttle at pressure 1, `[0, MAX_THROTTLE]`.
        max: f64,
        /// `k`, in `(0, 50]`: larger is flatter at first and steeper near 1.
        steepness: f64,
    },
    /// QEMU auto-converge's ladder: 0 below `start`, then `initial`, `initial + increment`, ... up to `max`,
    /// with the steps spread evenly over `[start, 1]`. Monotone, not continuous.
    Step {
        /// Pressure of the first step, `[0, 1)`.
        start: f64,
        /// Throttle of the first step, `(0, max]` (QEMU: 0.2).
        initial: f64,
        /// Throttle added per step, `(0, max]` (QEMU: 0.1).
        increment: f64,
        /// Cap, `(0, MAX_THROTTLE]` (QEMU: 0.99).
        max: f64,
        /// Each step adds at most half of what remains below `max` (QEMU's `cpu-throttle-tailslow`).
        tail_slow: bool,
    },
    /// Straight lines between points; flat before the first and after the last. Continuous.
    Piecewise {
        /// `(pressure, throttle)` points, pressures strictly increasing in `[0, 1]`, throttles
        /// non-decreasing in `[0, MAX_THROTTLE]`.
        points: Vec<(f64, f64)>,
    },
}

fn check(
    kind: &'static str,
    name: &'static str,
    v: f64,
    ok: bool,
    range: &'static str,
) -> Result<(), CurveError> {
    if ok && v.is_finite() {
        Ok(())
    } else {
        Err(CurveError::OutOfRange {
            kind,
            name,
            value: v,
            range,
        })
    }
}

impl Curve {
    /// A linear curve; see [`Curve::Linear`].
    ///
    /// # Errors
    /// [`CurveError::OutOfRange`].
    pub fn linear(start: f64, max: f64) -> Result<Self, CurveError> {
        let c = Curve::Linear { start, max };
        c.validate()?;
        Ok(c)
    }

    /// An exponential curve; see [`Curve::Exponential`].
    ///
    /// # Errors
    /// [`CurveError::OutOfRange`].
    pub fn exponential(start: f64, max: f64, steepness: f64) -> Result<Self, CurveError> {
        let c = Curve::Exponential {
            start,
            max,
            steepness,
        };
        c.validate()?;
        Ok(c)
    }

    /// QEMU's auto-converge defaults as a step curve starting at `start`: 20 %, +10 % a step, 99 % cap.
    ///
    /// # Errors
    /// [`CurveError::OutOfRange`] if `start` is not in `[0, 1)`.
    pub fn qemu_auto_converge(start: f64, tail_slow: bool) -> Result<Self, CurveError> {
        let c = Curve::Step {
            start,
            initial: 0.2,
            increment: 0.1,
            max: MAX_THROTTLE,
            tail_slow,
        };
        c.validate()?;
        Ok(c)
    }

    /// A piecewise-linear curve; see [`Curve::Piecewise`].
    ///
    /// # Errors
    /// [`CurveError::TooFewPoints`], [`CurveError::OutOfRange`], [`CurveError::PressureNotIncreasing`],
    /// [`CurveError::ThrottleDecreasing`].
    pub fn points(points: Vec<(f64, f64)>) -> Result<Self, CurveError> {
        let c = Curve::Piecewise { points };
        c.validate()?;
        Ok(c)
    }

    fn kind(&self) -> &'static str {
        match self {
            Curve::Linear { .. } => "linear",
            Curve::Exponential { .. } => "exponential",
            Curve::Step { .. } => "step",
            Curve::Piecewise { .. } => "points",
        }
    }

    /// Checks every parameter against its range.
    ///
    /// # Errors
    /// The first [`CurveError`] found.
    pub fn validate(&self) -> Result<(), CurveError> {
        let k = self.kind();
        match *self {
            Curve::Linear { start, max } => {
                check(k, "start", start, (0.0..1.0).contains(&start), "[0, 1)")?;
                check(
                    k,
                    "max",
                    max,
                    (0.0..=MAX_THROTTLE).contains(&max),
                    "[0, 0.99]",
                )
            }
            Curve::Exponential {
                start,
                max,
                steepness,
            } => {
                check(k, "start", start, (0.0..1.0).contains(&start), "[0, 1)")?;
                check(
                    k,
                    "max",
                    max,
                    (0.0..=MAX_THROTTLE).contains(&max),
                    "[0, 0.99]",
                )?;
                check(
                    k,
                    "steepness",
                    steepness,
                    steepness > 0.0 && steepness <= 50.0,
                    "(0, 50]",
                )
            }
            Curve::Step {
                start,
                initial,
                increment,
                max,
                ..
            } => {
                check(k, "start", start, (0.0..1.0).contains(&start), "[0, 1)")?;
                check(k, "max", max, max > 0.0 && max <= MAX_THROTTLE, "(0, 0.99]")?;
                check(
                    k,
                    "initial",
                    initial,
                    initial > 0.0 && initial <= max,
                    "(0, max]",
                )?;
                check(
                    k,
                    "increment",
                    increment,
                    increment > 0.0 && increment <= max,
                    "(0, max]",
                )
            }
            Curve::Piecewise { ref points } => {
                if points.len() < 2 {
                    return Err(CurveError::TooFewPoints(points.len()));
                }
                for (index, &(x, y)) in points.iter().enumerate() {
                    check(k, "pressure", x, (0.0..=1.0).contains(&x), "[0, 1]")?;
                    check(
                        k,
                        "throttle",
                        y,
                        (0.0..=MAX_THROTTLE).contains(&y),
                        "[0, 0.99]",
                    )?;
                    if index > 0 {
                        let (px, py) = points[index - 1];
                        if x <= px {
                            return Err(CurveError::PressureNotIncreasing { index, x, prev: px });
                        }
                        if y < py {
                            return Err(CurveError::ThrottleDecreasing { index, y, prev: py });
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// The throttle fraction for `pressure` (clamped to `[0, 1]`; NaN counts as 0).
    pub fn throttle(&self, pressure: f64) -> f64 {
        let p = if pressure.is_nan() {
            0.0
        } else {
            pressure.clamp(0.0, 1.0)
        };
        let t = match *self {
            Curve::Linear { start, max } => {
                if p <= start {
                    0.0
                } else {
                    max * (p - start) / (1.0 - start)
                }
            }
            Curve::Exponential {
                start,
                max,
                steepness,
            } => {
                if p <= start {
                    0.0
                } else {
                    let x = (p - start) / (1.0 - start);
                    max * (steepness * x).exp_m1() / steepness.exp_m1()
                }
            }
            Curve::Step {
                start,
                initial,
                increment,
                max,
                tail_slow,
            } => {
                if p < start {
                    0.0
                } else {
                    let levels = Self::step_levels(initial, increment, max, tail_slow);
                    // Steps spread evenly over [start, 1]: the last one is reached at pressure 1.
                    let n = levels.len();
                    let i = if n == 1 || start >= 1.0 {
                        n - 1
                    } else {
                        (((p - start) / (1.0 - start)) * (n - 1) as f64).floor() as usize
                    };
                    levels[i.min(n - 1)]
                }
            }
            Curve::Piecewise { ref points } => {
                let (x0, y0) = points[0];
                let (xn, yn) = points[points.len() - 1];
                if p <= x0 {
                    y0
                } else if p >= xn {
                    yn
                } else {
                    let i = points.partition_point(|&(x, _)| x <= p);
                    let (xa, ya) = points[i - 1];
                    let (xb, yb) = points[i];
                    ya + (yb - ya) * (p - xa) / (xb - xa)
                }
            }
        };
        t.clamp(0.0, MAX_THROTTLE)
    }

    /// The throttle levels of a step curve, first to last.
    fn step_levels(initial: f64, increment: f64, max: f64, tail_slow: bool) -> Vec<f64> {
        let mut levels = vec![initial.min(max)];
        while levels.len() < 1000 {
            let cur = *levels.last().expect("non-empty");
            let remaining = max - cur;
            if remaining <= 1e-9 {
                break;
            }
            let next = if tail_slow {
                cur + increment.min(remaining / 2.0).max(1e-3)
            } else {
                // From the first level, not the previous one, so that rounding does not accumulate.
                initial + increment * levels.len() as f64
            };
            levels.push(next.min(max));
        }
        levels
    }

    /// The largest throttle this curve asks for.
    pub fn max_throttle(&self) -> f64 {
        self.throttle(1.0)
    }

    /// Whether the curve has no jumps (all but [`Curve::Step`]).
    pub fn is_continuous(&self) -> bool {
        !matches!(self, Curve::Step { .. })
    }

    /// Parses the string form (see the module docs), e.g. `linear:start=0.5,max=0.9`. Parameters left out
    /// take their defaults: `start` 0.5 (0 for step), `max` 0.9 (0.99 for step), `steepness` 4,
    /// `initial` 0.2, `increment` 0.1, `tailslow` false.
    ///
    /// # Errors
    /// [`CurveError`] naming the unknown kind, the bad `key=value`, or the value out of range.
    pub fn parse(s: &str) -> Result<Self, CurveError> {
        let s = s.trim();
        let (kind, params) = s.split_once(':').unwrap_or((s, ""));
        let kind: &'static str = match kind {
            "linear" => "linear",
            "exponential" | "exp" => "exponential",
            "step" | "qemu" => "step",
            "points" => "points",
            other => return Err(CurveError::UnknownKind(other.to_string())),
        };
        let bad = |param: &str, why: &str| CurveError::BadParam {
            kind,
            param: param.to_string(),
            why: why.to_string(),
        };
        let num = |param: &str, v: &str| -> Result<f64, CurveError> {
            v.trim()
                .parse::<f64>()
                .map_err(|_| bad(param, "expected a number"))
        };
        let pairs = params.split(',').filter(|p| !p.trim().is_empty());
        let c = if kind == "points" {
            let mut points = Vec::new();
            for param in pairs {
                let (x, y) = param
                    .split_once('=')
                    .ok_or_else(|| bad(param, "expected pressure=throttle"))?;
                points.push((num(param, x)?, num(param, y)?));
            }
            Curve::Piecewise { points }
        } else {
            let step = kind == "step";
            let (mut start, mut max) = if step {
                (0.0, MAX_THROTTLE)
            } else {
                (0.5, 0.9)
            };
            let (mut steepness, mut initial, mut increment, mut tail_slow) = (4.0, 0.2, 0.1, false);
            for param in pairs {
                let (k, v) = param
                    .split_once('=')
                    .ok_or_else(|| bad(param, "expected key=value"))?;
                match (kind, k.trim()) {
                    (_, "start") => start = num(param, v)?,
                    (_, "max") => max = num(param, v)?,
                    ("exponential", "steepness") => steepness = num(param, v)?,
                    ("step", "initial") => initial = num(param, v)?,
                    ("step", "increment") => increment = num(param, v)?,
                    ("step", "tailslow") => {
                        tail_slow = v
                            .trim()
                            .parse()
                            .map_err(|_| bad(param, "expected true or false"))?
                    }
                    _ => return Err(bad(param, "unknown key for this curve")),
                }
            }
            match kind {
                "linear" => Curve::Linear { start, max },
                "exponential" => Curve::Exponential {
                    start,
                    max,
                    steepness,
                },
                _ => Curve::Step {
                    start,
                    initial,
                    increment,
                    max,
                    tail_slow,
                },
            }
        };
        c.validate()?;
        Ok(c)
    }

    /// Reads a curve from TOML: either `kind = "linear" | "exponential" | "step"` with that curve's keys
    /// (`tailslow` for step), or `points = [[pressure, throttle], ...]`.
    ///
    /// # Errors
    /// [`CurveError::Toml`] for TOML syntax or unknown keys, or the curve's own [`CurveError`].
    #[cfg(feature = "toml")]
    pub fn from_toml(text: &str) -> Result<Self, CurveError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Spec {
            kind: Option<String>,
            start: Option<f64>,
            max: Option<f64>,
            steepness: Option<f64>,
            initial: Option<f64>,
            increment: Option<f64>,
            tailslow: Option<bool>,
            points: Option<Vec<[f64; 2]>>,
        }
        let spec: Spec =
            toml::from_str(text).map_err(|e| CurveError::Toml(e.message().to_string()))?;
        if let Some(points) = spec.points {
            if spec.kind.as_deref().is_some_and(|k| k != "points") {
                return Err(CurveError::Toml(
                    "`points` goes with kind = \"points\" (or no kind)".into(),
                ));
            }
            return Curve::points(points.into_iter().map(|[x, y]| (x, y)).collect());
        }
        let kind = spec
            .kind
            .ok_or_else(|| CurveError::Toml("a curve needs `kind` or `points`".into()))?;
        let mut s = format!("{kind}:");
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                s.push_str(&format!("{k}={v},"));
            }
        };
        add("start", spec.start.map(|v| v.to_string()));
        add("max", spec.max.map(|v| v.to_string()));
        add("steepness", spec.steepness.map(|v| v.to_string()));
        add("initial", spec.initial.map(|v| v.to_string()));
        add("increment", spec.increment.map(|v| v.to_string()));
        add("tailslow", spec.tailslow.map(|v| v.to_string()));
        Curve::parse(&s)
    }
}

impl fmt::Display for Curve {
    /// The canonical string form, which [`Curve::parse`] reads back to an equal curve.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Curve::Linear { start, max } => write!(f, "linear:start={start},max={max}"),
            Curve::Exponential {
                start,
                max,
                steepness,
            } => write!(f, "exponential:start={start},max={max},steepness={steepness}"),
            Curve::Step {
                start,
                initial,
                increment,
                max,
                tail_slow,
            } => write!(
                f,
                "step:start={start},initial={initial},increment={increment},max={max},tailslow={tail_slow}"
            ),
            Curve::Piecewise { points } => {
                write!(f, "points:")?;
                for (i, (x, y)) in points.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{x}={y}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::str::FromStr for Curve {
    type Err = CurveError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Curve::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_curve() -> impl Strategy<Value = Curve> {
        let unit = 0.0f64..0.99;
        prop_oneof![
            (unit.clone(), 0.0f64..=0.99)
                .prop_map(|(start, max)| Curve::linear(start, max).unwrap()),
            (unit.clone(), 0.0f64..=0.99, 0.01f64..20.0)
                .prop_map(|(s, m, k)| Curve::exponential(s, m, k).unwrap()),
            (
                unit.clone(),
                0.01f64..=0.99,
                0.01f64..1.0,
                0.01f64..1.0,
                any::<bool>()
            )
                .prop_map(|(start, max, a, b, tail_slow)| Curve::Step {
                    start,
                    initial: (a * max).max(1e-3),
                    increment: (b * max).max(1e-3),
                    max,
                    tail_slow,
                }),
            proptest::collection::vec((0.0f64..=1.0, 0.0f64..=0.99), 2..8).prop_filter_map(
                "distinct pressures",
                |mut pts| {
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    pts.dedup_by(|a, b| (a.0 - b.0).abs() < 1e-6);
                    let mut ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
                    ys.sort_by(f64::total_cmp);
                    let pts: Vec<(f64, f64)> = pts.iter().zip(ys).map(|(p, y)| (p.0, y)).collect();
                    Curve::points(pts).ok()
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn monotone_and_bounded(c in any_curve(), a in -0.5f64..1.5, b in -0.5f64..1.5) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let (tl, th) = (c.throttle(lo), c.throttle(hi));
            prop_assert!(tl <= th + 1e-12, "{c}: f({lo}) = {tl} > f({hi}) = {th}");
            prop_assert!((0.0..=MAX_THROTTLE).contains(&tl) && th <= c.max_throttle() + 1e-12);
        }

        #[test]
        fn continuous_where_it_says_so(c in any_curve(), p in 0.0f64..1.0) {
            prop_assume!(c.is_continuous());
            // Each curve's slope is bounded; 1e-7 of pressure can move the throttle by far less than 1e-3.
            let d = (c.throttle(p + 1e-7) - c.throttle(p)).abs();
            prop_assert!(d < 1e-3, "{c}: jump of {d} at {p}");
        }

        #[test]
        fn the_string_form_round_trips(c in any_curve()) {
            let back = Curve::parse(&c.to_string()).unwrap();
            prop_assert_eq!(back, c);
        }
    }

    #[test]
    fn shapes() {
        let l = Curve::parse("linear:start=0.5,max=0.9").unwrap();
        assert_eq!(l.throttle(0.25), 0.0);
        assert!((l.throttle(0.75) - 0.45).abs() < 1e-12);
        assert!((l.throttle(1.0) - 0.9).abs() < 1e-12);
        let e = Curve::parse("exponential:start=0,max=0.9,steepness=4").unwrap();
        assert!(
            e.throttle(0.5) < l.throttle(0.9),
            "exponential is gentle first"
        );
        assert!((e.throttle(1.0) - 0.9).abs() < 1e-12);
        let p = Curve::parse("points:0.5=0,0.8=0.3,1=0.9").unwrap();
        assert!((p.throttle(0.65) - 0.15).abs() < 1e-12);
        assert!((p.throttle(0.9) - 0.6).abs() < 1e-12);
    }

    #[test]
    fn qemu_ladder() {
        let q = Curve::qemu_auto_converge(0.0, false).unwrap();
        // 20 %, 30 %, ..., 90 %, then the 99 % cap: 9 levels, 8 steps of 1/8 of pressure each.
        let levels = Curve::step_levels(0.2, 0.1, 0.99, false);
        assert_eq!(levels.len(), 9, "{levels:?}");
        assert!((q.throttle(0.0) - 0.2).abs() < 1e-12);
        assert!((q.throttle(0.124) - 0.2).abs() < 1e-12);
        assert!((q.throttle(0.126) - 0.3).abs() < 1e-12);
        assert!((q.throttle(0.99) - 0.9).abs() < 1e-12);
        assert!((q.throttle(1.0) - 0.99).abs() < 1e-12);
        let slow = Curve::step_levels(0.2, 0.1, 0.99, true);
        assert!(
            slow.len() > levels.len(),
            "tail-slow takes smaller steps near the cap"
        );
        let tail: Vec<f64> = slow.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(tail.last().unwrap() < &0.1);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = Curve::parse("points:0.5=0,0.4=0.3").unwrap_err();
        assert!(
            e.to_string().contains("pressures must strictly increase"),
            "{e}"
        );
        let e = Curve::parse("points:0.5=0.4,0.8=0.3").unwrap_err();
        assert!(e.to_string().contains("throttle must not decrease"), "{e}");
        let e = Curve::parse("linear:start=0.5,max=1.5").unwrap_err();
        assert_eq!(
            e.to_string(),
            "curve linear: max = 1.5 is outside [0, 0.99]"
        );
        let e = Curve::parse("linear:steepness=3").unwrap_err();
        assert!(e.to_string().contains("unknown key"), "{e}");
        let e = Curve::parse("cubic").unwrap_err();
        assert!(e.to_string().contains("unknown curve"), "{e}");
        let e = Curve::parse("exponential:steepness=abc").unwrap_err();
        assert!(e.to_string().contains("expected a number"), "{e}");
        assert!(matches!(
            Curve::parse("points:0.5=0"),
            Err(CurveError::TooFewPoints(1))
        ));
    }

    #[cfg(feature = "toml")]
    #[test]
    fn toml_forms() {
        let c = Curve::from_toml("points = [[0.5, 0.0], [0.8, 0.3], [1.0, 0.9]]").unwrap();
        assert_eq!(c, Curve::parse("points:0.5=0,0.8=0.3,1=0.9").unwrap());
        let c = Curve::from_toml("kind = \"step\"\ntailslow = true").unwrap();
        assert!(matches!(
            c,
            Curve::Step {
                tail_slow: true,
                ..
            }
        ));
        let e = Curve::from_toml("points = [[0.5, 0.5], [0.8, 0.3]]").unwrap_err();
        assert!(e.to_string().contains("throttle must not decrease"), "{e}");
        let e = Curve::from_toml("kind = \"linear\"\nsteep = 2").unwrap_err();
        assert!(e.to_string().contains("steep"), "{e}");
    }
}
