//! Model FLOPs of a training step, the numerator of model FLOPs utilisation (MFU):
//! `6 × (parameters read by matrix products) × tokens` plus attention's
//! `12 × heads × head_dim × (keys each query sees, on average) × tokens` (QKᵀ and PV, forward and
//! twice that backward), counting only the keys a sliding window lets a query see.

use crate::op::mean_keys_per_query;
use crate::plan::Program;
use crate::Op;

/// Training FLOPs per token at sequence length `seq`, from the program's evaluation plan.
pub fn train_flops_per_token(program: &Program, seq: u64) -> Result<f64, String> {
    let plan = program.plan("eval").map_err(|e| e.0)?;
    let mut flops = 0.0;
    for step in &plan.steps {
        match &step.op {
            // The weight is the second input; its elements are the multiply-adds per token.
            Op::MatMul | Op::CrossEntropy | Op::Logits | Op::TokenLogProbs => {
                let w = &plan.values[step.inputs[1] as usize];
                flops += 6.0 * w.shape.fixed_elems() as f64;
            }
            Op::Attention(a) => {
                flops += 12.0 * (a.heads * a.head_dim) as f64 * mean_keys_per_query(seq, a.window);
            }
            _ => {}
        }
    }
    Ok(flops)
}
