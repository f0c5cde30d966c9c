//! MLIR text to PTX, in-process, through melior's pass manager.
//!
//! Each kernel is its own module: parsed, verified, lowered with one fixed pipeline, and its
//! `#gpu.object` payload read back. Every failure (parse, verify, a pass, an unresolved
//! libdevice call in the PTX) becomes an error naming the kernel, with MLIR's diagnostics.

use melior::{
    dialect::DialectRegistry,
    ir::{
        attribute::{ArrayAttribute, AttributeLike},
        operation::OperationLike,
        BlockLike, Module,
    },
    pass::PassManager,
    utility::{parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes},
    Context,
};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Once;

/// The lowering pipeline for every weft kernel (scalar SIMT code over `!llvm.ptr` buffers, shared
/// memory as workgroup memrefs). `gpu-module-to-binary{format=isa}` runs NVPTX and yields PTX.
pub const PIPELINE: &str = "builtin.module(gpu.module(convert-scf-to-cf, convert-gpu-to-nvvm, canonicalize, cse, \
     reconcile-unrealized-casts), gpu-module-to-binary{format=isa})";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub kernel: String,
    pub message: String,
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "kernel `{}`: {}", self.kernel, self.message)
    }
}

impl std::error::Error for CompileError {}

/// An MLIR context with every dialect, pass and LLVM translation registered; reused for all the
/// kernels of a build (making one costs ~10 ms).
pub struct Compiler {
    context: Context,
    diagnostics: Rc<RefCell<Vec<String>>>,
}

static REGISTER_PASSES: Once = Once::new();

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

impl Compiler {
    pub fn new() -> Compiler {
        REGISTER_PASSES.call_once(register_all_passes);
        let registry = DialectRegistry::new();
        register_all_dialects(&registry);
        let context = Context::new();
        context.append_dialect_registry(&registry);
        context.load_all_available_dialects();
        register_all_llvm_translations(&context);
        // Single-threaded: the builder compiles kernels in parallel at a coarser grain.
        context.enable_multi_threading(false);
        let diagnostics = Rc::new(RefCell::new(Vec::new()));
        let sink = diagnostics.clone();
        context.attach_diagnostic_handler(move |d| {
            sink.borrow_mut().push(format!("{} {d}", d.location()));
            true
        });
        Compiler { context, diagnostics }
    }

    fn fail(&self, kernel: &str, what: &str) -> CompileError {
        let diags = std::mem::take(&mut *self.diagnostics.borrow_mut());
        let message = if diags.is_empty() { what.to_string() } else { format!("{what}:\n  {}", diags.join("\n  ")) };
        CompileError { kernel: kernel.to_string(), message }
    }

    /// Lowers one kernel module to PTX text.
    pub fn ptx(&self, kernel: &str, mlir: &str) -> Result<String, CompileError> {
        self.diagnostics.borrow_mut().clear();
        let mut module = Module::parse(&self.context, mlir).ok_or_else(|| self.fail(kernel, "MLIR does not parse"))?;
        if !module.as_operation().verify() {
            return Err(self.fail(kernel, "MLIR does not verify"));
        }
        let pm = PassManager::new(&self.context);
        parse_pass_pipeline(pm.as_operation_pass_manager(), PIPELINE).map_err(|e| self.fail(kernel, &e.to_string()))?;
        pm.run(&mut module).map_err(|e| self.fail(kernel, &format!("lowering failed ({e})")))?;
        let objects = gpu_objects(&module).map_err(|e| self.fail(kernel, &e))?;
        let bytes = objects.into_iter().next().ok_or_else(|| self.fail(kernel, "lowering produced no PTX"))?;
        let ptx = String::from_utf8(bytes.into_iter().take_while(|&b| b != 0).collect())
            .map_err(|_| self.fail(kernel, "the PTX is not UTF-8"))?;
        if let Some(line) = ptx.lines().find(|l| l.contains(".extern .func")) {
            return Err(self.fail(
                kernel,
                &format!(
                    "the PTX calls a function it does not define (`{}`): an operation became a libdevice call",
                    line.trim()
                ),
            ));
        }
        Ok(ptx)
    }
}

/// The payload of every `#gpu.object` of every `gpu.binary` in the module.
fn gpu_objects(module: &Module) -> Result<Vec<Vec<u8>>, String> {
    let mut objects = Vec::new();
    let mut op = module.body().first_operation();
    while let Some(o) = op {
        if o.name().as_string_ref().as_str() == Ok("gpu.binary") {
            let attr = o.attribute("objects").map_err(|e| e.to_string())?;
            let arr = ArrayAttribute::try_from(attr).map_err(|e| e.to_string())?;
            for i in 0..arr.len() {
                let attr = arr.element(i).map_err(|e| e.to_string())?;
                // SAFETY: the attribute is checked to be a #gpu.object before its payload is read;
                // the payload is copied out while the module (its owner) is alive.
                unsafe {
                    if !mlir_sys::mlirAttributeIsAGPUObjectAttr(attr.to_raw()) {
                        return Err("gpu.binary holds an object of an unexpected kind".into());
                    }
                    let s = mlir_sys::mlirGPUObjectAttrGetObject(attr.to_raw());
                    objects.push(std::slice::from_raw_parts(s.data as *const u8, s.length).to_vec());
                }
            }
        }
        op = o.next_in_block();
    }
    Ok(objects)
}
