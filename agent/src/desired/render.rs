//! Templates: one minijinja environment per module, loading from the
//! module's `templates/` folder through the [`Source`] (never the host
//! filesystem), strict about undefined values.

use std::sync::{Arc, Mutex};

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};

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

pub struct ModuleEnv {
    env: Environment<'static>,
}

impl ModuleEnv {
    pub fn new(source: Arc<dyn Source>, module: &str) -> ModuleEnv {
        ModuleEnv::with_secrets(
            source,
            module,
            Arc::new(crate::secrets::resolve::Offline),
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
    ) -> ModuleEnv {
        ModuleEnv::with_loader_dir(
            source,
            format!("modules/{module}/templates"),
            secrets,
            usage,
        )
    }

    /// An environment whose templates (`{% include %}`) load from the
    /// repo-relative folder `dir` (a Kubernetes stack's folder).
    pub fn with_loader_dir(
        source: Arc<dyn Source>,
        dir: String,
        secrets: Arc<dyn SecretSource>,
        usage: Arc<Mutex<SecretUsage>>,
    ) -> ModuleEnv {
        let mut env = Environment::new();
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
        ModuleEnv { env }
    }

    /// Renders an inline string; strings without template syntax are returned as they are.
    pub fn render_str(&self, text: &str, ctx: &Value) -> Result<String, minijinja::Error> {
        if !(text.contains("{{") || text.contains("{%") || text.contains("{#")) {
            return Ok(text.to_string());
        }
        self.env.render_str(text, ctx)
    }

    pub fn render_template(&self, name: &str, ctx: &Value) -> Result<String, minijinja::Error> {
        self.env.get_template(name)?.render(ctx)
    }

    /// Evaluates a `when:` expression to a boolean.
    pub fn eval_condition(&self, expr: &str, ctx: &Value) -> Result<bool, minijinja::Error> {
        let value = self.env.compile_expression(expr)?.eval(ctx)?;
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
pub fn describe(e: &minijinja::Error) -> String {
    let mut msg = e.kind().to_string();
    if let Some(detail) = e.detail() {
        msg.push_str(": ");
        msg.push_str(detail);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::LocalDir;

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
