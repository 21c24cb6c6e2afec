//! Schedule times: one syntax in module YAML, translated per backend.
//!
//! The syntax is cron's five fields, `MINUTE HOUR DAY-OF-MONTH MONTH
//! DAY-OF-WEEK`, each `*`, a number, a range `a-b`, a step `*/n` or `a-b/n`,
//! or a comma list of those (weekdays also as `mon`..`sun`, months as
//! `jan`..`dec`), or one of `hourly`, `daily`, `weekly`, `monthly`, `yearly`
//! (with or without a leading `@`). Times are the host's local time.
//!
//! systemd gets an `OnCalendar=` expression; launchd gets
//! `StartCalendarInterval` dictionaries (launchd has no ranges or steps, so
//! they are expanded: at most [`MAX_LAUNCHD_INTERVALS`]).
//!
//! Cron ORs day-of-month and day-of-week when both are restricted, systemd
//! ANDs them: such an expression is refused rather than meaning two things.

use std::collections::BTreeSet;
use std::fmt::Write;

/// launchd gets one dictionary per combination of restricted fields.
pub const MAX_LAUNCHD_INTERVALS: usize = 256;

/// A parsed calendar expression. `None` fields are wildcards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    pub source: String,
    pub minute: Option<BTreeSet<u32>>,
    pub hour: Option<BTreeSet<u32>>,
    pub day: Option<BTreeSet<u32>>,
    pub month: Option<BTreeSet<u32>>,
    /// 0 = Sunday .. 6 = Saturday.
    pub weekday: Option<BTreeSet<u32>>,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
const SYSTEMD_WEEKDAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// Value of names[0].
    names_base: u32,
}

const FIELDS: [Field; 5] = [
    Field {
        name: "minute",
        min: 0,
        max: 59,
        names: &[],
        names_base: 0,
    },
    Field {
        name: "hour",
        min: 0,
        max: 23,
        names: &[],
        names_base: 0,
    },
    Field {
        name: "day of month",
        min: 1,
        max: 31,
        names: &[],
        names_base: 0,
    },
    Field {
        name: "month",
        min: 1,
        max: 12,
        names: &MONTHS,
        names_base: 1,
    },
    Field {
        name: "day of week",
        min: 0,
        max: 7,
        names: &WEEKDAYS,
        names_base: 0,
    },
];

/// Why a calendar expression is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    #[error("`{value}` is not a valid {field}")]
    NotAValue { value: String, field: &'static str },
    #[error("{field} `{n}` is out of range ({min}-{max})")]
    OutOfRange {
        field: &'static str,
        n: u32,
        min: u32,
        max: u32,
    },
    #[error("step `/{step}` in the {field} must be a positive number")]
    BadStep { step: String, field: &'static str },
    #[error("range `{range}` in the {field} runs backwards")]
    Backwards { range: String, field: &'static str },
    #[error("`{expr}` has {count} field(s); a calendar is five cron fields (minute hour day-of-month month day-of-week) or hourly/daily/weekly/monthly/yearly")]
    FieldCount { expr: String, count: usize },
    #[error("`{expr}` restricts both the day of month and the day of week: cron runs on either, systemd only on both; restrict one of them")]
    BothDays { expr: String },
    #[error("`{expr}` expands to more than {MAX_LAUNCHD_INTERVALS} launchd calendar intervals; use fewer values")]
    TooManyIntervals { expr: String },
}

fn value(f: &Field, s: &str) -> Result<u32, CalendarError> {
    let lower = s.to_ascii_lowercase();
    if let Some(i) = f.names.iter().position(|n| *n == lower) {
        return Ok(i as u32 + f.names_base);
    }
    let n: u32 = s.parse().map_err(|_| CalendarError::NotAValue {
        value: s.to_string(),
        field: f.name,
    })?;
    if n < f.min || n > f.max {
        return Err(CalendarError::OutOfRange {
            field: f.name,
            n,
            min: f.min,
            max: f.max,
        });
    }
    Ok(n)
}

fn field(f: &Field, s: &str) -> Result<Option<BTreeSet<u32>>, CalendarError> {
    if s == "*" {
        return Ok(None);
    }
    let mut set = BTreeSet::new();
    for part in s.split(',') {
        let (range, step) =
            match part.split_once('/') {
                Some((r, st)) => {
                    let step: u32 = st.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        CalendarError::BadStep {
                            step: st.to_string(),
                            field: f.name,
                        }
                    })?;
                    (r, step)
                }
                None => (part, 1),
            };
        let (lo, hi) = if range == "*" {
            (f.min, f.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(f, a)?, value(f, b)?);
            if a > b {
                return Err(CalendarError::Backwards {
                    range: range.to_string(),
                    field: f.name,
                });
            }
            (a, b)
        } else {
            let v = value(f, range)?;
            (v, if step > 1 { f.max } else { v })
        };
        let mut v = lo;
        while v <= hi {
            set.insert(v);
            v += step;
        }
    }
    if f.max == 7 && set.remove(&7) {
        set.insert(0); // 7 is Sunday too
    }
    let full = (f.min..=f.max.min(if f.max == 7 { 6 } else { f.max })).count();
    Ok(if set.len() == full { None } else { Some(set) })
}

impl Calendar {
    /// Parses an expression; the error says what is wrong.
    pub fn parse(expr: &str) -> Result<Calendar, CalendarError> {
        let trimmed = expr.trim();
        let alias = trimmed.strip_prefix('@').unwrap_or(trimmed);
        let five = match alias {
            "hourly" => "0 * * * *",
            "daily" | "midnight" => "0 0 * * *",
            "weekly" => "0 0 * * 0",
            "monthly" => "0 0 1 * *",
            "yearly" | "annually" => "0 0 1 1 *",
            other => other,
        };
        let parts: Vec<&str> = five.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CalendarError::FieldCount {
                expr: expr.to_string(),
                count: parts.len(),
            });
        }
        let mut sets = Vec::new();
        for (f, s) in FIELDS.iter().zip(&parts) {
            sets.push(field(f, s)?);
        }
        let cal = Calendar {
            source: trimmed.to_string(),
            minute: sets[0].take(),
            hour: sets[1].take(),
            day: sets[2].take(),
            month: sets[3].take(),
            weekday: sets[4].take(),
        };
        if cal.day.is_some() && cal.weekday.is_some() {
            return Err(CalendarError::BothDays {
                expr: expr.to_string(),
            });
        }
        Ok(cal)
    }

    /// The systemd `OnCalendar=` expression.
    pub fn on_calendar(&self) -> String {
        let mut out = String::new();
        if let Some(w) = &self.weekday {
            out.push_str(&runs(w, |v| SYSTEMD_WEEKDAYS[v as usize].to_string()));
            out.push(' ');
        }
        let _ = write!(
            out,
            "*-{}-{} {}:{}:00",
            opt(&self.month, |v| format!("{v:02}")),
            opt(&self.day, |v| format!("{v:02}")),
            opt(&self.hour, |v| format!("{v:02}")),
            opt(&self.minute, |v| format!("{v:02}")),
        );
        out
    }

    /// launchd `StartCalendarInterval` entries: one map per combination of
    /// restricted fields (key, value) in launchd's key names.
    pub fn launchd_intervals(&self) -> Result<Vec<Vec<(&'static str, u32)>>, CalendarError> {
        let fields: [(&'static str, &Option<BTreeSet<u32>>); 5] = [
            ("Minute", &self.minute),
            ("Hour", &self.hour),
            ("Day", &self.day),
            ("Month", &self.month),
            ("Weekday", &self.weekday),
        ];
        let mut combos: Vec<Vec<(&'static str, u32)>> = vec![Vec::new()];
        for (key, set) in fields {
            let Some(set) = set else { continue };
            let mut next = Vec::with_capacity(combos.len() * set.len());
            for c in &combos {
                for &v in set {
                    let mut c = c.clone();
                    c.push((key, v));
                    next.push(c);
                }
            }
            combos = next;
            if combos.len() > MAX_LAUNCHD_INTERVALS {
                return Err(CalendarError::TooManyIntervals {
                    expr: self.source.clone(),
                });
            }
        }
        Ok(combos)
    }
}

fn opt(set: &Option<BTreeSet<u32>>, fmt: impl Fn(u32) -> String) -> String {
    match set {
        None => "*".to_string(),
        Some(s) => runs(s, fmt),
    }
}

/// `1,2,3,7` → `01..03,07` (systemd accepts `a..b` ranges and lists).
fn runs(set: &BTreeSet<u32>, fmt: impl Fn(u32) -> String) -> String {
    let values: Vec<u32> = set.iter().copied().collect();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let start = values[i];
        let mut j = i;
        while j + 1 < values.len() && values[j + 1] == values[j] + 1 {
            j += 1;
        }
        if j >= i + 2 {
            parts.push(format!("{}..{}", fmt(start), fmt(values[j])));
        } else {
            for &v in &values[i..=j] {
                parts.push(fmt(v));
            }
        }
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oc(s: &str) -> String {
        Calendar::parse(s).unwrap().on_calendar()
    }

    #[test]
    fn translates_to_on_calendar() {
        assert_eq!(oc("daily"), "*-*-* 00:00:00");
        assert_eq!(oc("@hourly"), "*-*-* *:00:00");
        assert_eq!(oc("30 2 * * *"), "*-*-* 02:30:00");
        assert_eq!(oc("*/15 * * * *"), "*-*-* *:00,15,30,45:00");
        assert_eq!(oc("0 9 * * mon-fri"), "Mon..Fri *-*-* 09:00:00");
        assert_eq!(oc("0 3 1,15 * *"), "*-*-01,15 03:00:00");
        assert_eq!(oc("0 0 * jan-mar *"), "*-01..03-* 00:00:00");
        assert_eq!(oc("0 4 * * 7"), "Sun *-*-* 04:00:00");
        assert_eq!(oc("0 4 * * 0-7"), "*-*-* 04:00:00");
    }

    #[test]
    fn expands_for_launchd() {
        let c = Calendar::parse("30 2 * * *").unwrap();
        assert_eq!(
            c.launchd_intervals().unwrap(),
            vec![vec![("Minute", 30), ("Hour", 2)]]
        );
        let c = Calendar::parse("0 9 * * 1-5").unwrap();
        assert_eq!(c.launchd_intervals().unwrap().len(), 5);
        let c = Calendar::parse("* * * * *").unwrap();
        assert_eq!(c.launchd_intervals().unwrap(), vec![Vec::new()]);
        let c = Calendar::parse("*/2 */2 1-20 * *").unwrap();
        assert!(c
            .launchd_intervals()
            .unwrap_err()
            .to_string()
            .contains("more than 256"));
    }

    #[test]
    fn refuses_bad_expressions_clearly() {
        for (expr, want) in [
            ("0 25 * * *", "hour `25` is out of range (0-23)"),
            ("61 * * * *", "minute `61` is out of range"),
            ("0 0 * *", "has 4 field(s)"),
            (
                "0 0 1 * mon",
                "restricts both the day of month and the day of week",
            ),
            ("0 0 * * funday", "`funday` is not a valid day of week"),
            ("*/0 * * * *", "must be a positive number"),
            ("0 5-3 * * *", "runs backwards"),
            ("sometimes", "has 1 field(s)"),
        ] {
            let err = Calendar::parse(expr).unwrap_err().to_string();
            assert!(err.contains(want), "{expr}: {err}");
        }
    }
}
