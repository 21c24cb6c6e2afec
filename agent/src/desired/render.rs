//! Templates: one minijinja environment per module, loading from the
//! module's `templates/` folder through the [`Source`] (never the host
//! filesystem), strict about undefined values.
//!
//! Templates come from the repository, which is untrusted: every rendering
//! is bounded (see [`FUEL_PER_RENDER`]) and an error never carries a value
//! `secret()` returned (see [`ModuleEnv::render_str`]).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use minijinja::value::{Kwargs, Rest, StringInput, ValueKind, ValueOrKwargs};
use minijinja::{AutoEscape, Environment, ErrorKind, State, Template, UndefinedBehavior, Value};

use super::yaml::thousands;
use crate::secrets::resolve::{SecretError, SecretSource};
use crate::secrets::{Reference, SecretValue};
use crate::source::Source;

/// Secrets one resource's rendering used: the values (for redaction) and the
/// references that did not resolve (the resource is then skipped).
#[derive(Default)]
pub struct SecretUsage {
    pub values: Vec<SecretValue>,
    pub failures: Vec<(Reference, SecretError)>,
    /// `secret()` is allowed only while a file's content is rendered
    /// (`content`, `template`): anywhere else (a path, a symlink target, an
    /// owner, `when:`) its value would be printed in plans and logs.
    pub allowed: bool,
    /// Render every `secret()` as [`crate::secrets::REDACTED`] without
    /// resolving it: the masked preview of a file's content for plans.
    pub mask: bool,
}

/// What `secret()` renders when a reference cannot be resolved; the resource
/// is skipped, so this never reaches a host.
pub const UNRESOLVED: &str = "<unresolved secret>";

/// The bounds of template work. minijinja counts one unit of fuel per
/// instruction; one rendering (a string, a template with its includes, a
/// `when:` expression) may use [`FUEL_PER_RENDER`], and all renderings of one
/// load (one host revision) together [`FUEL_PER_LOAD`], so a repository
/// cannot multiply the work by repeating a template in many strings. The
/// reference homelab's largest template uses 246 instructions and its largest
/// host 1,395 in all; 1,000,000 instructions of nested loops take 0.03 to
/// 0.11 s in a release build (measured on a busy 2-core machine), so a load
/// stops within about half a second of template work.
pub const FUEL_PER_RENDER: u64 = 1_000_000;
/// See [`FUEL_PER_RENDER`].
pub const FUEL_PER_LOAD: u64 = 5_000_000;
/// minijinja's recursion limit: an include costs 10, a macro call 4, so this
/// allows 20 nested includes or 50 nested macro calls.
pub const RECURSION_LIMIT: usize = 200;
/// What one rendering may produce: 4 MiB, the size of the largest YAML file
/// the agent reads (a rendered file is kept in memory, hashed and diffed).
pub const MAX_RENDERED_BYTES: usize = 4 * 1024 * 1024;

/// The fuel left for one load, shared by every environment of it.
pub struct RenderBudget {
    remaining: AtomicU64,
}

impl Default for RenderBudget {
    fn default() -> Self {
        RenderBudget {
            remaining: AtomicU64::new(FUEL_PER_LOAD),
        }
    }
}

/// What a failed rendering is taken to have used: minijinja reports the fuel
/// of a successful rendering only. One that ran out used all of it; any
/// other is charged its time at 20 ns an instruction (instructions were
/// measured at 30 to 110 ns, so this charges at least what ran), so a
/// template that loops most of its fuel
/// and then fails cannot be repeated without limit, while ordinary
/// mistakes (microseconds each) cost next to nothing: a revision with a
/// thousand template errors still has them all reported.
fn fuel_of_failure(e: &minijinja::Error, took: std::time::Duration) -> u64 {
    if innermost(e).kind() == ErrorKind::OutOfFuel {
        return FUEL_PER_RENDER;
    }
    u64::try_from(took.as_nanos() / 20)
        .unwrap_or(u64::MAX)
        .min(FUEL_PER_RENDER)
}

impl RenderBudget {
    fn check(&self) -> Result<(), minijinja::Error> {
        if self.remaining.load(Ordering::Relaxed) == 0 {
            return Err(RenderLimit::Budget.error());
        }
        Ok(())
    }

    fn spend(&self, fuel: u64) {
        let _ = self
            .remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(fuel))
            });
    }
}

/// A bound of the rendering was reached: the source of the minijinja error
/// that reports it (minijinja's own fuel error is [`ErrorKind::OutOfFuel`]).
#[derive(Debug, thiserror::Error)]
pub enum RenderLimit {
    #[error("the output is over 4 MiB, the limit for one rendering")]
    Output,
    #[error("not rendered: the templates of this revision used up their budget of {} instructions", thousands(FUEL_PER_LOAD as usize))]
    Budget,
    /// A filter argument that sizes an allocation (`indent` width, `tojson`
    /// indent, a `format` width or precision) over its bound.
    #[error("{0}")]
    Argument(String),
}

impl RenderLimit {
    fn error(self) -> minijinja::Error {
        minijinja::Error::new(ErrorKind::InvalidOperation, self.to_string()).with_source(self)
    }
}

/// The source of an error whose detail was withheld (see
/// [`ModuleEnv::render_str`]): where it happened, which the replacement
/// error cannot carry itself.
#[derive(Debug, thiserror::Error)]
#[error("the details are withheld because this rendering used values of secret()")]
pub struct Withheld {
    name: Option<String>,
    line: Option<usize>,
}

/// The template and line an error happened in: that of the innermost
/// error (an included template), or of one whose detail was withheld.
pub fn location(e: &minijinja::Error) -> (Option<&str>, Option<usize>) {
    let inner = innermost(e);
    match std::error::Error::source(inner).and_then(|s| s.downcast_ref::<Withheld>()) {
        Some(w) => (w.name.as_deref(), w.line),
        None => (inner.name(), inner.line()),
    }
}

/// What to do about an error that [`is_limit`].
pub const LIMIT_HINT: &str = "templates are bounded: 1,000,000 instructions and 4 MiB of output per rendering, 5,000,000 instructions per revision; look for a loop over a huge range, a template that includes itself or a macro that calls itself without end";

/// Whether `e` is a bound of the rendering (fuel, output size, budget),
/// rather than a mistake in the template.
pub fn is_limit(e: &minijinja::Error) -> bool {
    let inner = innermost(e);
    inner.kind() == ErrorKind::OutOfFuel
        || std::error::Error::source(inner).is_some_and(|s| s.is::<RenderLimit>())
}

/// The largest `format` width or precision, and `tojson` indent, allowed.
const MAX_FORMAT_WIDTH: usize = 10_000;
const MAX_JSON_INDENT: usize = 32;

/// minijinja's builtins that allocate by an argument, not by their input,
/// take one instruction of fuel whatever they cost: `'x' | indent(10**10)`
/// asks for 10 GB at once (and aborts the process when refused). These
/// wrappers bound the argument, then call the builtin.
fn bounded_indent(
    value: StringInput<'_>,
    width: Option<usize>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<Value, minijinja::Error> {
    let w = match width {
        Some(w) => w,
        None => kwargs.peek::<Option<usize>>("width")?.unwrap_or(4),
    };
    let text = value.as_str();
    let lines = text.bytes().filter(|b| *b == b'\n').count() + 1;
    if w.saturating_mul(lines).saturating_add(text.len()) > MAX_RENDERED_BYTES {
        return Err(RenderLimit::Argument(format!(
            "`indent({w})` of {lines} lines would make over 4 MiB, the limit for one rendering"
        ))
        .error());
    }
    minijinja::filters::indent(value, width, first, blank, kwargs)
}

fn bounded_tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, minijinja::Error> {
    let requested = match &indent {
        Some(v) => Some(v.clone()),
        None => kwargs.peek::<Option<Value>>("indent")?,
    };
    if let Some(n) = requested.and_then(|v| usize::try_from(v).ok()) {
        if n > MAX_JSON_INDENT {
            return Err(RenderLimit::Argument(format!(
                "`tojson` indent {n} is over {MAX_JSON_INDENT}, the limit"
            ))
            .error());
        }
    }
    minijinja::filters::tojson(value, indent, kwargs)
}

fn bounded_format(
    state: &mut minijinja::State,
    format_str: &Value,
    args: Rest<ValueOrKwargs>,
) -> Result<Value, minijinja::Error> {
    if let Some(text) = format_str.as_str() {
        // Every number inside a conversion (`%-10.3f`) is a width or a
        // precision: minijinja pads to it.
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                continue;
            }
            let mut number = String::new();
            while let Some(&d) = chars.peek() {
                if d.is_ascii_digit() {
                    number.push(d);
                } else if "-+ #0.,_'*".contains(d) {
                    if !number.is_empty() {
                        check_format_number(&number)?;
                        number.clear();
                    }
                } else {
                    break;
                }
                chars.next();
            }
            if !number.is_empty() {
                check_format_number(&number)?;
            }
        }
    }
    minijinja::filters::format(state, format_str, args)
}

fn bounded_replace(
    state: &mut minijinja::State,
    value: StringInput<'_>,
    from: StringInput<'_>,
    to: StringInput<'_>,
) -> Result<Value, minijinja::Error> {
    let (text, old, new) = (value.as_str(), from.as_str(), to.as_str());
    if new.len() > old.len() {
        let count = if old.is_empty() {
            text.chars().count() + 1
        } else {
            text.matches(old).count()
        };
        let size = count
            .saturating_mul(new.len() - old.len())
            .saturating_add(text.len());
        if size > MAX_RENDERED_BYTES {
            return Err(RenderLimit::Argument(format!(
                "`replace` would make {} bytes, over 4 MiB, the limit for one rendering",
                thousands(size)
            ))
            .error());
        }
    }
    minijinja::filters::replace(state, value, from, to)
}

fn bounded_join(
    state: &mut minijinja::State,
    value: &Value,
    joiner: Option<StringInput<'_>>,
    attribute: Option<&str>,
    kwargs: Kwargs,
) -> Result<Value, minijinja::Error> {
    // Each item's full text is at least what it contributes (an attribute
    // of it is shorter); stop counting at the limit.
    if let (Ok(items), false) = (
        value.try_iter(),
        value.is_undefined() || value.as_str().is_some(),
    ) {
        let sep = joiner.as_ref().map_or(0, |j| j.as_str().len());
        let mut size = 0usize;
        for (i, item) in items.enumerate() {
            let len = match item.as_str() {
                Some(s) => s.len(),
                None => item.to_string().len(),
            };
            size = size
                .saturating_add(len)
                .saturating_add(if i > 0 { sep } else { 0 });
            if size > MAX_RENDERED_BYTES {
                return Err(RenderLimit::Argument(
                    "`join` would make over 4 MiB, the limit for one rendering".into(),
                )
                .error());
            }
        }
    }
    minijinja::filters::join(state, value, joiner, attribute, kwargs)
}

fn check_format_number(number: &str) -> Result<(), minijinja::Error> {
    if number
        .parse::<usize>()
        .map_or(true, |n| n > MAX_FORMAT_WIDTH)
    {
        return Err(RenderLimit::Argument(format!(
            "a `format` width or precision of {number} is over {}, the limit",
            thousands(MAX_FORMAT_WIDTH)
        ))
        .error());
    }
    Ok(())
}

/// Whether `value` is undefined the way a misspelt name is: strict mode
/// refuses to turn it into a string. (The "silent" undefined of
/// `'x' if false` is not; minijinja exposes the difference only this way.)
fn is_missing(state: &State, value: &Value) -> bool {
    value.is_undefined() && StringInput::new(state, value).is_err()
}

/// Where an undefined value was found among a filter's or test's arguments.
enum Found {
    /// The value itself, or one inside it.
    Value { inside: bool },
    /// A positional argument after the value (1-based, as written).
    Argument { position: usize, inside: bool },
    /// A keyword argument.
    Keyword(String),
}

impl Found {
    /// The error for `what` (a filter, a test, or "printed"), with what to do.
    fn error(&self, what: &str, test: Option<bool>) -> minijinja::Error {
        let kind = match test {
            Some(true) => format!("the test `{what}`"),
            Some(false) => format!("the filter `{what}`"),
            None => String::new(),
        };
        let place = match self {
            Found::Value { inside: false } if test.is_none() => String::new(),
            Found::Value { inside: true } if test.is_none() => {
                "a value printed holds an undefined value".to_string()
            }
            Found::Value { inside: false } => format!("{kind} was given an undefined value"),
            Found::Value { inside: true } => {
                format!("{kind} was given a value that holds an undefined value")
            }
            Found::Argument {
                position,
                inside: false,
            } => format!("argument {position} of {kind} is undefined"),
            Found::Argument {
                position,
                inside: true,
            } => format!("argument {position} of {kind} holds an undefined value"),
            Found::Keyword(key) => format!("argument `{key}` of {kind} is undefined"),
        };
        minijinja::Error::new(
            ErrorKind::UndefinedError,
            format!("{place} (a misspelt param or variable?)"),
        )
    }
}

/// An undefined value inside `value` (a list or map, at any depth), not
/// `value` itself. Lazy iterables are not walked (they are not consumed
/// here); the walk costs what the filters it guards spend anyway turning the
/// value into text.
fn undefined_inside(state: &State, value: &Value) -> Option<Found> {
    let mut stack = vec![value.clone()];
    while let Some(v) = stack.pop() {
        match v.kind() {
            ValueKind::Undefined if is_missing(state, &v) => {
                return Some(Found::Value { inside: true })
            }
            ValueKind::Seq => stack.extend(v.try_iter().into_iter().flatten()),
            ValueKind::Map => {
                for key in v.try_iter().into_iter().flatten() {
                    if let Ok(item) = v.get_item(&key) {
                        stack.push(item);
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// How a wrapped builtin takes undefined arguments (see [`strict_builtins`]).
#[derive(Clone, Copy, PartialEq)]
enum Strictness {
    /// No argument may be undefined.
    Arguments,
    /// Nor hold an undefined value inside (a list or a map): the filters
    /// that turn their arguments into text.
    Inside,
    /// The value may be undefined (`default`); its other arguments may not.
    AllButValue,
}

/// `f` (a builtin filter or test), refusing undefined arguments first.
fn strict(
    name: &'static str,
    test: bool,
    how: Strictness,
    f: Value,
) -> impl Fn(&mut State, Rest<ValueOrKwargs>) -> Result<Value, minijinja::Error> + Send + Sync + 'static
{
    move |state: &mut State, args: Rest<ValueOrKwargs>| {
        let args = args.into_values();
        for (i, arg) in args.iter().enumerate() {
            if i == 0 && how == Strictness::AllButValue {
                continue;
            }
            let found = if arg.is_kwargs() {
                arg.try_iter().into_iter().flatten().find_map(|key| {
                    let v = arg.get_item(&key).ok()?;
                    is_missing(state, &v).then(|| Found::Keyword(key.to_string()))
                })
            } else if is_missing(state, arg) {
                Some(match i {
                    0 => Found::Value { inside: false },
                    _ => Found::Argument {
                        position: i,
                        inside: false,
                    },
                })
            } else if how == Strictness::Inside {
                undefined_inside(state, arg).map(|_| match i {
                    0 => Found::Value { inside: true },
                    _ => Found::Argument {
                        position: i,
                        inside: true,
                    },
                })
            } else {
                None
            };
            if let Some(found) = found {
                return Err(found.error(name, Some(test)));
            }
        }
        if let Some(attribute) = looked_up_attribute(name, &args) {
            if let Some(item) = item_without(state, &args[0], &attribute) {
                return Err(minijinja::Error::new(
                    ErrorKind::UndefinedError,
                    format!(
                        "the filter `{name}` looks up the attribute `{attribute}` of each item, and item {item} (counting from 0) has none (a misspelt attribute?); give every item one, pass `default=` to `map`, or pick the items that have it first with `selectattr('{attribute}', 'defined')`"
                    ),
                ));
            }
        }
        f.call(state, &args)
    }
}

/// The attribute a filter looks each item up by (`map(attribute='x')`,
/// `selectattr('x')`, `sort(attribute='x')`, ...), unless it has a fallback
/// for items without it (`default=`, or the tests `defined`/`undefined`,
/// which is how items that have it are picked).
fn looked_up_attribute(name: &str, args: &[Value]) -> Option<Value> {
    let kwargs = args.iter().find(|a| a.is_kwargs());
    let keyword = |key: &str| {
        kwargs
            .and_then(|k| k.get_item(&Value::from(key)).ok())
            .filter(|v| !v.is_undefined())
    };
    let positional = |i: usize| args.get(i).filter(|a| !a.is_kwargs()).cloned();
    if keyword("default").is_some() {
        return None;
    }
    match name {
        "selectattr" | "rejectattr" => {
            let test = positional(2);
            if matches!(
                test.as_ref().and_then(Value::as_str),
                Some("defined" | "undefined")
            ) {
                return None;
            }
            positional(1)
        }
        "groupby" => positional(1).or_else(|| keyword("attribute")),
        "map" | "sort" | "unique" | "min" | "max" | "sum" | "join" => keyword("attribute"),
        _ => None,
    }
}

/// The index of the first item of `value` (a list or map, not a lazy
/// iterable: it is not consumed here) without `attribute` (a dotted path,
/// as the filters take it: `user.name`, `ports.0`).
fn item_without(state: &State, value: &Value, attribute: &Value) -> Option<usize> {
    if !matches!(value.kind(), ValueKind::Seq | ValueKind::Map) {
        return None;
    }
    let lookup = |item: &Value| -> Option<Value> {
        match attribute.as_str() {
            Some(path) => {
                let mut v = item.clone();
                for part in path.split('.') {
                    v = match part.parse::<usize>() {
                        Ok(i) => v.get_item(&Value::from(i)).ok()?,
                        Err(_) => v.get_attr(part).ok()?,
                    };
                }
                Some(v)
            }
            None => item.get_item(attribute).ok(),
        }
    };
    value
        .try_iter()
        .ok()?
        .enumerate()
        .find(|(_, item)| lookup(item).is_none_or(|v| is_missing(state, &v)))
        .map(|(i, _)| i)
}

/// Replaces every builtin filter and test with one that refuses undefined
/// arguments. minijinja's strict mode refuses an undefined value only where
/// it becomes a string, is iterated or tested for truth: a filter or test
/// that takes any value (`tojson`, `join`'s separator, `indent`'s width,
/// `is eq(...)`, `is string`, ...) would otherwise make `null`, a default
/// or `false` of a misspelt name. Exceptions: `default` takes an undefined
/// value (that is what it is for), and the tests `defined` and `undefined`.
/// The lists are minijinja 3.0's builtins (`src/defaults.rs`), the
/// bounded ones (above) in place of theirs.
fn strict_builtins(env: &mut Environment<'static>) {
    use minijinja::{filters as f, tests as t};
    use Strictness::{AllButValue, Arguments, Inside};
    let filters: [(&'static str, Strictness, Value); 48] = [
        ("safe", Inside, Value::from_function(f::safe)),
        ("escape", Inside, Value::from_function(f::escape)),
        ("e", Inside, Value::from_function(f::escape)),
        ("lower", Inside, Value::from_function(f::lower)),
        ("upper", Inside, Value::from_function(f::upper)),
        ("title", Inside, Value::from_function(f::title)),
        ("capitalize", Inside, Value::from_function(f::capitalize)),
        ("replace", Inside, Value::from_function(bounded_replace)),
        ("length", Arguments, Value::from_function(f::length)),
        ("count", Arguments, Value::from_function(f::length)),
        ("dictsort", Arguments, Value::from_function(f::dictsort)),
        ("items", Arguments, Value::from_function(f::items)),
        ("reverse", Arguments, Value::from_function(f::reverse)),
        ("trim", Inside, Value::from_function(f::trim)),
        ("join", Inside, Value::from_function(bounded_join)),
        ("split", Inside, Value::from_function(f::split)),
        ("lines", Inside, Value::from_function(f::lines)),
        ("default", AllButValue, Value::from_function(f::default)),
        ("d", AllButValue, Value::from_function(f::default)),
        ("round", Arguments, Value::from_function(f::round)),
        ("abs", Arguments, Value::from_function(f::abs)),
        ("int", Arguments, Value::from_function(f::int)),
        ("float", Arguments, Value::from_function(f::float)),
        ("attr", Arguments, Value::from_function(f::attr)),
        ("first", Arguments, Value::from_function(f::first)),
        ("last", Arguments, Value::from_function(f::last)),
        ("min", Arguments, Value::from_function(f::min)),
        ("max", Arguments, Value::from_function(f::max)),
        ("sort", Arguments, Value::from_function(f::sort)),
        ("list", Arguments, Value::from_function(f::list)),
        ("string", Inside, Value::from_function(f::string)),
        ("bool", Arguments, Value::from_function(f::bool)),
        ("batch", Arguments, Value::from_function(f::batch)),
        ("slice", Arguments, Value::from_function(f::slice)),
        ("sum", Arguments, Value::from_function(f::sum)),
        ("indent", Inside, Value::from_function(bounded_indent)),
        ("select", Arguments, Value::from_function(f::select)),
        ("reject", Arguments, Value::from_function(f::reject)),
        ("selectattr", Arguments, Value::from_function(f::selectattr)),
        ("rejectattr", Arguments, Value::from_function(f::rejectattr)),
        ("map", Arguments, Value::from_function(f::map)),
        ("groupby", Arguments, Value::from_function(f::groupby)),
        ("unique", Arguments, Value::from_function(f::unique)),
        ("chain", Arguments, Value::from_function(f::chain)),
        ("zip", Arguments, Value::from_function(f::zip)),
        ("pprint", Inside, Value::from_function(f::pprint)),
        ("format", Inside, Value::from_function(bounded_format)),
        ("tojson", Inside, Value::from_function(bounded_tojson)),
    ];
    for (name, how, filter) in filters {
        env.add_filter(name, strict(name, false, how, filter));
    }
    let tests: [(&'static str, Value); 40] = [
        ("none", Value::from_function(t::is_none)),
        ("safe", Value::from_function(t::is_safe)),
        ("escaped", Value::from_function(t::is_safe)),
        ("boolean", Value::from_function(t::is_boolean)),
        ("odd", Value::from_function(t::is_odd)),
        ("even", Value::from_function(t::is_even)),
        ("divisibleby", Value::from_function(t::is_divisibleby)),
        ("number", Value::from_function(t::is_number)),
        ("integer", Value::from_function(t::is_integer)),
        ("int", Value::from_function(t::is_integer)),
        ("float", Value::from_function(t::is_float)),
        ("string", Value::from_function(t::is_string)),
        ("sequence", Value::from_function(t::is_sequence)),
        ("iterable", Value::from_function(t::is_iterable)),
        ("mapping", Value::from_function(t::is_mapping)),
        ("startingwith", Value::from_function(t::is_startingwith)),
        ("endingwith", Value::from_function(t::is_endingwith)),
        ("lower", Value::from_function(t::is_lower)),
        ("upper", Value::from_function(t::is_upper)),
        ("sameas", Value::from_function(t::is_sameas)),
        ("eq", Value::from_function(t::is_eq)),
        ("equalto", Value::from_function(t::is_eq)),
        ("==", Value::from_function(t::is_eq)),
        ("ne", Value::from_function(t::is_ne)),
        ("!=", Value::from_function(t::is_ne)),
        ("lt", Value::from_function(t::is_lt)),
        ("lessthan", Value::from_function(t::is_lt)),
        ("<", Value::from_function(t::is_lt)),
        ("le", Value::from_function(t::is_le)),
        ("<=", Value::from_function(t::is_le)),
        ("gt", Value::from_function(t::is_gt)),
        ("greaterthan", Value::from_function(t::is_gt)),
        (">", Value::from_function(t::is_gt)),
        ("ge", Value::from_function(t::is_ge)),
        (">=", Value::from_function(t::is_ge)),
        ("in", Value::from_function(t::is_in)),
        ("true", Value::from_function(t::is_true)),
        ("false", Value::from_function(t::is_false)),
        ("filter", Value::from_function(t::is_filter)),
        ("test", Value::from_function(t::is_test)),
    ];
    for (name, test) in tests {
        env.add_test(name, strict(name, true, Strictness::Arguments, test));
    }
}

/// An output that refuses to grow past [`MAX_RENDERED_BYTES`].
struct CappedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl io::Write for &mut CappedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(io::Error::other("rendered output too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct ModuleEnv {
    env: Environment<'static>,
    budget: Arc<RenderBudget>,
    usage: Arc<Mutex<SecretUsage>>,
}

impl ModuleEnv {
    pub fn new(source: Arc<dyn Source>, module: &str) -> ModuleEnv {
        ModuleEnv::with_secrets(
            source,
            module,
            Arc::new(crate::secrets::resolve::Offline),
            Arc::default(),
            Arc::default(),
        )
    }

    /// An environment whose `secret("op://...")` resolves through `secrets`,
    /// recording what it used in `usage`.
    pub fn with_secrets(
        source: Arc<dyn Source>,
        module: &str,
        secrets: Arc<dyn SecretSource>,
        usage: Arc<Mutex<SecretUsage>>,
        budget: Arc<RenderBudget>,
    ) -> ModuleEnv {
        ModuleEnv::with_loader_dir(
            source,
            format!("modules/{module}/templates"),
            secrets,
            usage,
            budget,
        )
    }

    /// An environment whose templates (`{% include %}`) load from the
    /// repo-relative folder `dir` (a Kubernetes stack's folder).
    pub fn with_loader_dir(
        source: Arc<dyn Source>,
        dir: String,
        secrets: Arc<dyn SecretSource>,
        usage: Arc<Mutex<SecretUsage>>,
        budget: Arc<RenderBudget>,
    ) -> ModuleEnv {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL_PER_RENDER));
        env.set_recursion_limit(RECURSION_LIMIT);
        strict_builtins(&mut env);
        let secret_usage = usage.clone();
        env.add_function(
            "secret",
            move |reference: String| -> Result<String, minijinja::Error> {
                let parsed = Reference::parse(&reference).map_err(|e| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string())
                })?;
                {
                    let u = usage.lock().unwrap();
                    if !u.allowed {
                        return Err(minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            "secret() may only be used in a file's `content` or `template`: anywhere else its value would show in plans and logs",
                        ));
                    }
                    if u.mask {
                        return Ok(crate::secrets::REDACTED.to_string());
                    }
                }
                match secrets.resolve(&parsed) {
                    Ok(value) => {
                        let text = value.expose().to_string();
                        usage.lock().unwrap().values.push(value);
                        Ok(text)
                    }
                    Err(e) => {
                        usage.lock().unwrap().failures.push((parsed, e));
                        Ok(UNRESOLVED.to_string())
                    }
                }
            },
        );
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Printing refuses an undefined value inside a list or map too
        // (`{{ [params.typo] }}` would print `[undefined]`); a bare one is
        // minijinja's own strict rule, which lets `{{ 'x' if c }}` print "".
        env.set_formatter(|out, state, value| {
            if !value.is_undefined() {
                if let Some(found) = undefined_inside(state, value) {
                    return Err(found.error("printed", None));
                }
            }
            minijinja::escape_formatter(out, state, value)
        });
        // Config files are not HTML: minijinja would otherwise escape by file
        // extension (`/` becomes `&#x2f;` in a .json.j2 or .xml.j2 template).
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .keep_trailing_newline(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_loader(move |name: &str| {
            if name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            {
                return Ok(None);
            }
            match source.read(&format!("{dir}/{name}")) {
                Ok(Some(bytes)) => String::from_utf8(bytes).map(Some).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("template {name} is not UTF-8"),
                    )
                }),
                Ok(None) => Ok(None),
                Err(e) => Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    e.to_string(),
                )),
            }
        });
        ModuleEnv {
            env,
            budget,
            usage: secret_usage,
        }
    }

    /// Renders an inline string; strings without template syntax are returned as they are.
    ///
    /// Like every rendering here, it is bounded: [`FUEL_PER_RENDER`]
    /// instructions, [`RECURSION_LIMIT`], [`MAX_RENDERED_BYTES`] of output,
    /// and the load's [`RenderBudget`]. When it fails after `secret()`
    /// returned a value, the error is that of the same rendering with every
    /// `secret()` masked (see [`ModuleEnv::redacted`]): minijinja quotes
    /// values in its messages (an include name, a failed comparison, a
    /// filter's argument), and a value that never entered the rendering
    /// cannot be quoted.
    pub fn render_str(&self, text: &str, ctx: &Value) -> Result<String, minijinja::Error> {
        if !(text.contains("{{") || text.contains("{%") || text.contains("{#")) {
            return Ok(text.to_string());
        }
        self.redacted(|| {
            let env: &Environment<'_> = &self.env;
            self.bounded(env.template_from_str(text)?, ctx)
        })
    }

    pub fn render_template(&self, name: &str, ctx: &Value) -> Result<String, minijinja::Error> {
        self.redacted(|| self.bounded(self.env.get_template(name)?, ctx))
    }

    /// Renders `tmpl` within the bounds.
    fn bounded(&self, tmpl: Template<'_, '_>, ctx: &Value) -> Result<String, minijinja::Error> {
        self.budget.check()?;
        let mut out = CappedOutput {
            bytes: Vec::new(),
            overflowed: false,
        };
        let start = std::time::Instant::now();
        let result = tmpl.render_captured_to(ctx, &mut out);
        let used = match &result {
            Ok(captured) => captured.state().fuel_levels().map_or(0, |(used, _)| used),
            Err(e) => fuel_of_failure(e, start.elapsed()),
        };
        self.budget.spend(used);
        if out.overflowed {
            return Err(RenderLimit::Output.error());
        }
        result?;
        String::from_utf8(out.bytes).map_err(|_| {
            minijinja::Error::new(ErrorKind::InvalidOperation, "the output is not UTF-8")
        })
    }

    /// Runs `render`; when it fails after `secret()` resolved a value, runs
    /// it again with every `secret()` masked and returns that error instead
    /// (or, when the masked rendering succeeds, the error without its
    /// detail). Values resolved by the failed attempt stay recorded, so the
    /// resource still knows what to redact.
    fn redacted(
        &self,
        render: impl Fn() -> Result<String, minijinja::Error>,
    ) -> Result<String, minijinja::Error> {
        let before = self.usage.lock().unwrap().values.len();
        let err = match render() {
            Ok(out) => return Ok(out),
            Err(err) => err,
        };
        if self.usage.lock().unwrap().values.len() == before {
            return Err(err);
        }
        let was_masked = std::mem::replace(&mut self.usage.lock().unwrap().mask, true);
        let masked = render();
        self.usage.lock().unwrap().mask = was_masked;
        Err(match masked {
            Err(masked) => masked,
            Ok(_) => {
                let inner = innermost(&err);
                let withheld = Withheld {
                    name: inner.name().map(str::to_string),
                    line: inner.line(),
                };
                minijinja::Error::new(inner.kind(), withheld.to_string()).with_source(withheld)
            }
        })
    }

    /// Evaluates a `when:` expression to a boolean.
    pub fn eval_condition(&self, expr: &str, ctx: &Value) -> Result<bool, minijinja::Error> {
        self.budget.check()?;
        let start = std::time::Instant::now();
        let value = self.env.compile_expression(expr)?.eval(ctx);
        if let Err(e) = &value {
            self.budget.spend(fuel_of_failure(e, start.elapsed()));
        }
        let value = value?;
        // Strict mode still lets a bare undefined read as false; a typo in a
        // condition must not silently drop (and then prune) a resource.
        if value.is_undefined() {
            return Err(minijinja::Error::new(
                ErrorKind::UndefinedError,
                "the expression is undefined (a misspelt param or var?)",
            ));
        }
        Ok(value.is_true())
    }
}

/// `undefined value: 'x' is undefined` without the location (callers add it).
/// An error inside an included template is described by that error, with
/// the template and line it happened in (the outer one only says "bad include").
pub fn describe(e: &minijinja::Error) -> String {
    let inner = innermost(e);
    let mut msg = inner.kind().to_string();
    if inner.kind() == ErrorKind::OutOfFuel {
        msg = format!(
            "the rendering was stopped after {} instructions, the limit for one rendering",
            thousands(FUEL_PER_RENDER as usize)
        );
    } else if let Some(detail) = inner.detail() {
        msg.push_str(": ");
        msg.push_str(detail);
    }
    if !std::ptr::eq(inner, e) {
        if let (Some(name), Some(line)) = location(e) {
            msg.push_str(&format!(" (in {name} line {line})"));
        }
    }
    msg
}

/// The deepest minijinja error in `e`'s chain of sources: where an error in
/// an included template really is.
pub fn innermost(e: &minijinja::Error) -> &minijinja::Error {
    let mut inner = e;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(m) = s.downcast_ref::<minijinja::Error>() {
            inner = m;
        }
        source = s.source();
    }
    inner
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::resolve::SecretError;
    use crate::source::LocalDir;

    const SECRET: &str = "correct-horse-battery";

    /// Every reference resolves to [`SECRET`].
    struct Fixed;

    impl SecretSource for Fixed {
        fn resolve(&self, _: &Reference) -> Result<SecretValue, SecretError> {
            Ok(SecretValue::new(SECRET))
        }
    }

    /// A module `m` with `templates` (name, text), secrets allowed.
    fn env(templates: &[(&str, &str)]) -> (tempfile::TempDir, ModuleEnv) {
        let dir = tempfile::tempdir().unwrap();
        let tpl = dir.path().join("modules/m/templates");
        std::fs::create_dir_all(&tpl).unwrap();
        for (name, text) in templates {
            std::fs::write(tpl.join(name), text).unwrap();
        }
        let usage = Arc::new(Mutex::new(SecretUsage {
            allowed: true,
            ..SecretUsage::default()
        }));
        let env = ModuleEnv::with_secrets(
            Arc::new(LocalDir::open(dir.path()).unwrap()),
            "m",
            Arc::new(Fixed),
            usage,
            Arc::default(),
        );
        (dir, env)
    }

    /// The error of rendering `main.j2`, as the user reads it.
    fn error_of(templates: &[(&str, &str)]) -> String {
        let (_dir, env) = env(templates);
        let err = env
            .render_template("main.j2", &Value::from(()))
            .unwrap_err();
        let inner = innermost(&err);
        format!(
            "{}:{}: {}",
            inner.name().unwrap_or("-"),
            inner.line().unwrap_or(0),
            describe(&err)
        )
    }

    #[test]
    fn nested_loops_over_huge_ranges_run_out_of_fuel() {
        let err = error_of(&[(
            "main.j2",
            "a\n{% for i in range(100000) %}{% for j in range(100000) %}{% set x = j %}{% endfor %}{% endfor %}",
        )]);
        assert!(err.starts_with("main.j2:2: "), "{err}");
        assert!(
            err.contains("stopped after 1,000,000 instructions"),
            "{err}"
        );
    }

    #[test]
    fn a_self_including_template_hits_the_recursion_limit() {
        let err = error_of(&[("main.j2", "x\n{% include 'main.j2' %}")]);
        assert!(err.starts_with("main.j2:2: "), "{err}");
        assert!(err.contains("recursion limit exceeded"), "{err}");
        let err = error_of(&[(
            "main.j2",
            "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}\n{{ m(0) }}",
        )]);
        assert!(err.contains("recursion limit exceeded"), "{err}");
    }

    #[test]
    fn gigabyte_strings_are_refused() {
        let err = error_of(&[("main.j2", "{{ 'x' * 10 ** 10 }}")]);
        assert!(err.contains("repeated string is too large"), "{err}");
        // Under minijinja's own limit (100 MB) but over the output limit.
        let err = describe(
            &env(&[("main.j2", "{{ 'x' * 5000000 }}")])
                .1
                .render_template("main.j2", &Value::from(()))
                .unwrap_err(),
        );
        assert!(
            err.contains("over 4 MiB, the limit for one rendering"),
            "{err}"
        );
    }

    #[test]
    fn filters_that_allocate_by_their_argument_are_bounded() {
        for (text, want) in [
            (
                "{{ 'x' | indent(10 ** 10) }}",
                "`indent(10000000000)` of 1 lines",
            ),
            (
                "{{ 'x' | indent(width=10 ** 10) }}",
                "`indent(10000000000)`",
            ),
            (
                "{{ {'a': 1} | tojson(indent=10 ** 9) }}",
                "`tojson` indent 1000000000",
            ),
            (
                "{{ '%9999999999s' | format('x') }}",
                "width or precision of 9999999999",
            ),
            (
                "{{ '%.99999999f' | format(1.5) }}",
                "width or precision of 99999999",
            ),
            (
                "{{ ('x' * 1000000) | replace('', 'yyyyyyyyyy') }}",
                "`replace` would make 11,000,010 bytes",
            ),
            (
                "{{ range(100000) | join('x' * 1000) }}",
                "`join` would make over 4 MiB",
            ),
            (
                "{{ (['x' * 1000000] * 100000) | join }}",
                "`join` would make over 4 MiB",
            ),
        ] {
            let err = error_of(&[("main.j2", text)]);
            assert!(err.starts_with("main.j2:1: "), "{text}: {err}");
            assert!(err.contains(want), "{text}: {err}");
        }
        // Ordinary uses are untouched.
        let (_dir, env) = env(&[(
            "main.j2",
            "{{ 'a\nb' | indent(2) }}|{{ {'a': 1} | tojson(indent=2) }}|{{ '%-5s|%.2f' | format('x', 1.5) }}",
        )]);
        assert_eq!(
            env.render_template("main.j2", &Value::from(())).unwrap(),
            "a\n  b|{\n  \"a\": 1\n}|x    |1.50"
        );
    }

    #[test]
    fn the_budget_of_a_load_is_shared_by_all_renderings() {
        let (_dir, env) = env(&[(
            "main.j2",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        )]);
        let mut errors = Vec::new();
        for _ in 0..10 {
            errors.push(describe(
                &env.render_template("main.j2", &Value::from(()))
                    .unwrap_err(),
            ));
        }
        let refused = errors
            .iter()
            .filter(|e| e.contains("used up their budget"))
            .count();
        assert_eq!(
            refused,
            10 - (FUEL_PER_LOAD / FUEL_PER_RENDER) as usize,
            "{errors:?}"
        );
        // Ordinary mistakes cost next to nothing: all of them are reported.
        let (_dir2, typo) = super::tests::env(&[("main.j2", "{{ nope }}")]);
        for _ in 0..200 {
            let err = typo
                .render_template("main.j2", &Value::from(()))
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::UndefinedError, "{err}");
        }
        // A string without template syntax needs no budget.
        assert_eq!(env.render_str("plain", &Value::from(())).unwrap(), "plain");
    }

    #[test]
    fn a_missing_include_is_named() {
        let err = error_of(&[("main.j2", "a\n{% include 'nothere.j2' %}\n")]);
        assert!(err.starts_with("main.j2:2: "), "{err}");
        assert!(err.contains("'nothere.j2'"), "{err}");
        // An error inside an included template is reported where it is.
        let err = error_of(&[
            ("main.j2", "{% include 'inner.j2' %}"),
            ("inner.j2", "a\nb\n{{ nope }}"),
        ]);
        assert!(err.starts_with("inner.j2:3: "), "{err}");
        assert!(err.contains("(in inner.j2 line 3)"), "{err}");
    }

    #[test]
    fn errors_never_carry_a_value_of_secret() {
        let s = "secret('op://v/i/f')";
        for (what, text) in [
            ("include name", format!("{{% include {s} %}}")),
            ("extends name", format!("{{% extends {s} ~ '.j2' %}}")),
            ("filter error", format!("{{{{ {s} | int(strict=true) }}}}")),
            // (minijinja orders values of any types, so a comparison itself never fails.)
            ("filter argument", format!("{{{{ 'abc' | indent({s}) }}}}")),
            ("string minus number", format!("{{{{ {s} - 1 }}}}")),
            (
                "macro argument",
                format!("{{% macro m(a) %}}{{{{ a.x.y }}}}{{% endmacro %}}{{{{ m({s}) }}}}"),
            ),
            ("attribute of a value", format!("{{{{ {s}.nope.nope }}}}")),
            (
                "upper in an include",
                format!("{{% include {s} | upper %}}"),
            ),
            ("a call of the value", format!("{{{{ {s}() }}}}")),
            ("mapping key", format!("{{{{ {{'a': 1}}[{s}] }}}}")),
            (
                "when the masked rendering succeeds",
                format!("{{% if {s} == '{SECRET}' %}}{{{{ nope }}}}{{% endif %}}"),
            ),
        ] {
            let (_dir, env) = env(&[("main.j2", &text)]);
            let err = env
                .render_template("main.j2", &Value::from(()))
                .expect_err(what);
            let shown = format!("{} {:?} {:#}", describe(&err), err, err);
            for form in [SECRET.to_string(), SECRET.to_uppercase()] {
                assert!(!shown.contains(&form), "{what}: {shown}");
            }
            // Inline strings (`content:`) go the same way.
            let err = env.render_str(&text, &Value::from(())).expect_err(what);
            let shown = format!("{} {:?} {:#}", describe(&err), err, err);
            assert!(
                !shown.to_lowercase().contains(SECRET),
                "{what} (inline): {shown}"
            );
        }
    }

    /// Renders `main.j2` = `text` with `params` = {a: 1, l: [1, 2], m: {k: "v"}}.
    fn render_params(text: &str) -> Result<String, String> {
        render_with(
            text,
            minijinja::context! {
                params => minijinja::context! { a => 1, l => vec![1, 2], m => minijinja::context! { k => "v" } }
            },
        )
    }

    /// `rendered` (of `text`) failed on line 1 with an undefined-value error
    /// that says `want`.
    fn assert_undefined(rendered: &Result<String, String>, text: &str, want: &str) {
        let err = rendered.as_ref().expect_err(text);
        assert!(
            err.starts_with("main.j2:1: undefined value: ") && err.contains(want),
            "{text}: {err}"
        );
    }

    /// Renders `text` with `ctx`; an error as `file:line: what`.
    fn render_with(text: &str, ctx: Value) -> Result<String, String> {
        let (_dir, env) = env(&[("main.j2", text)]);
        env.render_template("main.j2", &ctx).map_err(|err| {
            let inner = innermost(&err);
            format!(
                "{}:{}: {}",
                inner.name().unwrap_or("-"),
                inner.line().unwrap_or(0),
                describe(&err)
            )
        })
    }

    /// Renders `text` with `params.users`: one item with `admin`, one without.
    fn render_users(text: &str) -> Result<String, String> {
        render_with(
            text,
            minijinja::context! {
                params => minijinja::context! { users => vec![
                    minijinja::context! { name => "a", admin => true },
                    minijinja::context! { name => "b" },
                ] }
            },
        )
    }

    #[test]
    fn tojson_of_an_undefined_value_is_an_error_not_null() {
        let err = render_params("a: 1\nb: {{ params.typo | tojson }}\n").unwrap_err();
        assert_eq!(
            err,
            "main.j2:2: undefined value: the filter `tojson` was given an undefined value (a misspelt param or variable?)"
        );
        for (text, want) in [
            (
                "{{ {'a': params.typo} | tojson }}",
                "the filter `tojson` was given a value that holds an undefined value",
            ),
            (
                "{{ dict(a=params.m.typo) | tojson(indent=2) }}",
                "the filter `tojson` was given a value that holds an undefined value",
            ),
            (
                "{{ params.l | tojson(indent=params.typo) }}",
                "argument `indent` of the filter `tojson` is undefined",
            ),
            (
                "{{ params.l | tojson(params.typo) }}",
                "argument 1 of the filter `tojson` is undefined",
            ),
            (
                "{{ namespace(a=params.typo).a | tojson }}",
                "the filter `tojson` was given an undefined value",
            ),
            (
                "{% macro m(x) %}{{ x | tojson }}{% endmacro %}{{ m() }}",
                "the filter `tojson` was given an undefined value",
            ),
        ] {
            assert_undefined(&render_params(text), text, want);
        }
    }

    #[test]
    fn every_builtin_filter_and_test_refuses_an_undefined_value() {
        // A filter given an undefined value: each one, so a filter that
        // reads any value (and would make null, "", [] or a default of a
        // misspelt name) is caught.
        for filter in [
            "safe",
            "escape",
            "e",
            "lower",
            "upper",
            "title",
            "capitalize",
            "replace('a', 'b')",
            "length",
            "count",
            "dictsort",
            "items",
            "reverse",
            "trim",
            "join(',')",
            "split",
            "lines",
            "round",
            "abs",
            "int",
            "float",
            "attr('x')",
            "first",
            "last",
            "min",
            "max",
            "sort",
            "list",
            "string",
            "bool",
            "batch(2)",
            "slice(2)",
            "sum",
            "indent(2)",
            "select",
            "reject",
            "selectattr('x')",
            "rejectattr('x')",
            "map('upper')",
            "groupby('x')",
            "unique",
            "chain([1])",
            "zip([1])",
            "pprint",
            "format",
            "tojson",
        ] {
            let err =
                render_params(&format!("{{{{ params.typo | {filter} }}}}")).expect_err(filter);
            let name = filter.split('(').next().unwrap();
            assert!(
                err.starts_with("main.j2:1: undefined value: ")
                    && err.contains(&format!("`{name}`")),
                "{filter}: {err}"
            );
        }
        for test in [
            "none",
            "safe",
            "escaped",
            "boolean",
            "odd",
            "even",
            "divisibleby(2)",
            "number",
            "integer",
            "int",
            "float",
            "string",
            "sequence",
            "iterable",
            "mapping",
            "startingwith('a')",
            "endingwith('a')",
            "lower",
            "upper",
            "sameas(1)",
            "eq(1)",
            "equalto(1)",
            "ne(1)",
            "lt(1)",
            "lessthan(1)",
            "le(1)",
            "gt(1)",
            "greaterthan(1)",
            "ge(1)",
            "in([1])",
            "true",
            "false",
            "filter",
            "test",
        ] {
            let err = render_params(&format!("{{{{ params.typo is {test} }}}}")).expect_err(test);
            assert!(
                err.starts_with("main.j2:1: undefined value: "),
                "{test}: {err}"
            );
        }
        // Undefined arguments, and undefined values inside what becomes text.
        for (text, want) in [
            (
                "{{ params.l | join(params.typo) }}",
                "argument 1 of the filter `join`",
            ),
            (
                "{{ 'abc' | indent(params.typo) }}",
                "argument 1 of the filter `indent`",
            ),
            (
                "{{ [params.typo] | join(',') }}",
                "`join` was given a value that holds",
            ),
            (
                "{{ params.typo | default(params.typo2) }}",
                "argument 1 of the filter `default`",
            ),
            (
                "{{ params.l | sort(attribute=params.typo) }}",
                "argument `attribute` of the filter `sort`",
            ),
            (
                "{{ params.a is eq(params.typo) }}",
                "argument 1 of the test `eq`",
            ),
            (
                "{{ params.l | select('eq', params.typo) | list }}",
                "argument 2 of the filter `select`",
            ),
            (
                "{{ '%s' | format([params.typo]) }}",
                "argument 1 of the filter `format` holds",
            ),
            (
                "{{ {'a': params.typo} }}",
                "a value printed holds an undefined value",
            ),
            (
                "{{ [1, [params.m.typo]] }}",
                "a value printed holds an undefined value",
            ),
        ] {
            assert_undefined(&render_params(text), text, want);
        }
    }

    #[test]
    fn an_item_without_the_attribute_a_filter_looks_up_is_an_error() {
        // params.users: [{name: a, admin: true}, {name: b}]
        for (filter, name) in [
            ("map(attribute='admin') | list", "map"),
            ("map(attribute='nmae') | join(',')", "map"),
            ("selectattr('admin') | list", "selectattr"),
            ("rejectattr('admin') | list", "rejectattr"),
            ("sort(attribute='admin') | list", "sort"),
            ("groupby('admin') | list", "groupby"),
            ("unique(attribute='admin') | list", "unique"),
            ("min(attribute='admin')", "min"),
            ("max(attribute='admin')", "max"),
            ("sum(attribute='admin')", "sum"),
            ("join(',', attribute='admin')", "join"),
            ("map(attribute='name.0.x') | list", "map"),
        ] {
            let text = format!("{{{{ params.users | {filter} }}}}");
            let rendered = render_users(&text);
            assert_undefined(
                &rendered,
                &text,
                &format!("the filter `{name}` looks up the attribute"),
            );
            assert_undefined(&rendered, &text, "has none");
        }
        // The ways to handle items without it still work.
        for (text, want) in [
            ("{{ params.users | selectattr('admin', 'defined') | map(attribute='name') | join(',') }}", "a"),
            ("{{ params.users | rejectattr('admin', 'defined') | map(attribute='name') | join(',') }}", "b"),
            ("{{ params.users | map(attribute='admin', default=false) | list }}", "[True, False]"),
            ("{{ params.users | map(attribute='name') | join(',') }}", "a,b"),
            ("{{ params.users | sort(attribute='name', reverse=true) | map(attribute='name') | join(',') }}", "b,a"),
            ("{{ params.users | map('length') | list }}", "[2, 1]"),
        ] {
            assert_eq!(render_users(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn what_handles_a_missing_value_still_does() {
        for (text, want) in [
            ("{{ params.typo is defined }}", "False"),
            ("{{ params.typo is undefined }}", "True"),
            ("{{ params.typo is not defined }}", "True"),
            ("{{ params.typo | default('d') | tojson }}", "\"d\""),
            ("{{ params.typo | d(params.a) }}", "1"),
            (
                "{% if params.typo is defined %}{{ params.typo | tojson }}{% endif %}",
                "",
            ),
            ("{{ [params.typo, 1] | select('defined') | list }}", "[1]"),
            ("[{{ 'x' if false }}]", "[]"),
            (
                "{{ params.m | tojson }} {{ params.l | join(',') }} {{ params.a is eq(1) }}",
                "{\"k\": \"v\"} 1,2 True",
            ),
        ] {
            assert_eq!(render_params(text).as_deref(), Ok(want), "{text}");
        }
    }

    #[test]
    fn templates_are_never_html_escaped_whatever_their_extension() {
        let dir = tempfile::tempdir().unwrap();
        let tpl = dir.path().join("modules/m/templates");
        std::fs::create_dir_all(&tpl).unwrap();
        std::fs::write(tpl.join("c.json.j2"), "{\"url\": \"{{ u }}\"}\n").unwrap();
        std::fs::write(tpl.join("c.xml.j2"), "<u>{{ u }}</u>\n").unwrap();
        let env = ModuleEnv::new(Arc::new(LocalDir::open(dir.path()).unwrap()), "m");
        let ctx = Value::from(std::collections::BTreeMap::from([(
            "u",
            Value::from("https://a/b?x=1&y=<2>"),
        )]));
        assert_eq!(
            env.render_template("c.json.j2", &ctx).unwrap(),
            "{\"url\": \"https://a/b?x=1&y=<2>\"}\n"
        );
        assert_eq!(
            env.render_template("c.xml.j2", &ctx).unwrap(),
            "<u>https://a/b?x=1&y=<2></u>\n"
        );
    }
}
