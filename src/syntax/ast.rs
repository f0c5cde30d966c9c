//! The syntax tree of a `.weft` file. Every node keeps its span so that later stages can point
//! their errors at the text the user wrote.

use crate::diag::{FileId, Span};

#[derive(Clone, Debug, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

impl<T> Spanned<T> {
    pub fn new(value: T, span: Span) -> Spanned<T> {
        Spanned { value, span }
    }
}

/// One parsed file.
#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub id: FileId,
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// `extends "base.weft"`
    Extends(Spanned<String>),
    Model(ModelBlock),
    Layer(LayerItem),
    Layers(LayersItem),
}

/// `model NAME { key = value ... }`
#[derive(Clone, Debug, PartialEq)]
pub struct ModelBlock {
    pub name: Spanned<String>,
    pub settings: Vec<KeyValue>,
    pub span: Span,
}

/// `key = value`, in a model block or a layer's argument list.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyValue {
    pub key: Spanned<String>,
    pub value: Spanned<Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A number as written; its meaning (integer, float, range) is checked where it is used.
    Number(String),
    Str(String),
    Name(String),
}

impl Value {
    /// How the value reads in an error message.
    pub fn describe(&self) -> String {
        match self {
            Value::Number(n) => format!("the number {n}"),
            Value::Str(s) => format!("the string \"{s}\""),
            Value::Name(n) => format!("`{n}`"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LayerItem {
    pub name: Spanned<String>,
    pub body: LayerBody,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum LayerBody {
    /// `layer NAME = KIND(args)`: a new definition (or a replacement of an inherited one).
    Define { kind: Spanned<String>, args: Vec<KeyValue> },
    /// `layer NAME(args)`: changes some arguments of an inherited definition.
    Patch { args: Vec<KeyValue> },
}

/// `layers = ...`
#[derive(Clone, Debug, PartialEq)]
pub struct LayersItem {
    pub terms: Vec<Term>,
    pub span: Span,
}

/// One element of a layer sequence, with an optional repetition `x N`.
#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub atom: Atom,
    pub repeat: Option<Spanned<u64>>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Atom {
    /// A layer definition's name.
    Name(Spanned<String>),
    /// `[a, b, c]`
    Group(Vec<Term>),
    /// `pattern("M-*-", M = mamba, "*" = swa, "-" = mlp)`, Megatron's hybrid pattern strings.
    Pattern { text: Spanned<String>, bindings: Vec<Binding> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    pub symbol: Spanned<String>,
    pub layer: Spanned<String>,
}
