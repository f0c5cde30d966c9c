//! ZeRO stage 1: the optimizer state sharded across data-parallel ranks.
//!
//! Each parameter is owned by one rank (largest first, each to the rank with the fewest elements
//! so far). A rank keeps AdamW's moments of its own parameters only, and its optimizer step
//! updates only those: its program is the whole one with the other ranks' AdamW steps and
//! moments taken out (on the GPU, the device steps those plan steps became too). After the step
//! each rank hands its updated parameters to the others (a broadcast per rank), so every rank
//! holds the whole model for the next forward pass. The gradient norm for clipping is still
//! taken over every gradient (each rank holds the summed gradients), and AdamW is elementwise, so
//! the numbers are those of one process: with one micro-batch a rank, bit for bit.
//!
//! Checkpoints stay whole: at a checkpoint the owners send their moments to rank 0, which saves
//! the full state; a run resumes on any number of ranks, each keeping its own share.

use crate::backend::Backend;
use crate::collective::Collective;
use crate::cpu::tensor::Tensor;
use crate::plan::{Program, StateSpec};
use crate::Op;
use std::collections::{BTreeMap, BTreeSet};

/// Which rank owns each parameter, and the whole program (for checkpoints).
pub struct Shards {
    world: usize,
    owner: BTreeMap<String, usize>,
    full: Program,
}

/// The AdamW moments of a parameter.
fn moments(param: &str) -> [String; 2] {
    [format!("adam_m:{param}"), format!("adam_v:{param}")]
}

fn elements(ty: &crate::TensorType) -> u64 {
    ty.shape.as_fixed().unwrap_or_default().iter().product()
}

impl Shards {
    pub fn new(program: &Program, world: usize) -> Shards {
        let mut order: Vec<(u64, &str)> = program.params.iter().map(|p| (elements(&p.ty), p.name.as_str())).collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let mut load = vec![0u64; world.max(1)];
        let mut owner = BTreeMap::new();
        for (n, name) in order {
            let r = (0..load.len()).min_by_key(|&r| (load[r], r)).expect("a rank");
            load[r] += n;
            owner.insert(name.to_string(), r);
        }
        Shards { world: world.max(1), owner, full: program.clone() }
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// The whole program: every rank's moments (what checkpoints hold).
    pub fn full(&self) -> &Program {
        &self.full
    }

    /// The parameters `rank` owns, in the program's order.
    pub fn owned_by(&self, rank: usize) -> Vec<String> {
        self.full.params.iter().map(|p| p.name.clone()).filter(|n| self.owner.get(n) == Some(&rank)).collect()
    }

    /// The moments `rank` keeps, in the program's order.
    fn moments_of(&self, rank: usize) -> Vec<&StateSpec> {
        let mine: BTreeSet<String> = self.owned_by(rank).iter().flat_map(|p| moments(p)).collect();
        self.full.states.iter().filter(|s| mine.contains(&s.name)).collect()
    }

    /// Rank `rank`'s program, and the indices of the optimizer plan's steps it leaves out.
    pub fn program_for(&self, rank: usize) -> Result<(Program, BTreeSet<usize>), String> {
        let mut p = self.full.clone();
        let theirs: BTreeSet<String> =
            self.full.params.iter().map(|q| q.name.clone()).filter(|n| self.owner.get(n) != Some(&rank)).collect();
        let their_moments: BTreeSet<String> = theirs.iter().flat_map(|q| moments(q)).collect();
        let plan = p.plans.get_mut("optimizer_step").ok_or("the program has no optimizer step")?;
        let by_value: BTreeMap<u32, &str> = plan.persistent.iter().map(|(n, v)| (*v, n.as_str())).collect();
        let dropped: BTreeSet<usize> = plan
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                matches!(s.op, Op::AdamW(_)) && by_value.get(&s.inputs[0]).is_some_and(|n| theirs.contains(*n))
            })
            .map(|(i, _)| i)
            .collect();
        let found = dropped.len();
        if found != theirs.len() {
            return Err(format!("the optimizer step updates {found} of the other ranks' {} parameters", theirs.len()));
        }
        plan.steps =
            plan.steps.iter().enumerate().filter(|(i, _)| !dropped.contains(i)).map(|(_, s)| s.clone()).collect();
        let read: BTreeSet<u32> = plan.steps.iter().flat_map(|s| s.inputs.iter().copied()).collect();
        plan.persistent.retain(|(n, v)| !their_moments.contains(n) && (read.contains(v) || !theirs.contains(n)));
        plan.updates.retain(|(n, _)| !theirs.contains(n) && !their_moments.contains(n));
        plan.validate().map_err(|e| e.0)?;
        p.states.retain(|s| !their_moments.contains(&s.name));
        Ok((p, dropped))
    }

    /// Rank `rank`'s bundle: its program, and the optimizer's device steps of the plan steps it
    /// leaves out taken out.
    pub fn bundle_for(&self, bundle: &crate::bundle::Bundle, rank: usize) -> Result<crate::bundle::Bundle, String> {
        let (program, dropped) = self.program_for(rank)?;
        let mut b = bundle.clone();
        b.program = program;
        if let Some((_, dp)) = b.plans.get_mut("optimizer_step") {
            let keep: Vec<bool> = dp.origin.iter().map(|o| !dropped.contains(o)).collect();
            let shift = |o: usize| o - dropped.range(..o).count();
            let mut i = 0;
            dp.steps.retain(|_| {
                i += 1;
                keep[i - 1]
            });
            dp.origin = dp.origin.iter().filter(|o| !dropped.contains(o)).map(|&o| shift(o)).collect();
        }
        Ok(b)
    }

    /// After an optimizer step: every rank's updated parameters to every rank.
    pub fn gather_params(&self, backend: &mut dyn Backend, group: &dyn Collective) -> Result<(), String> {
        let shapes: BTreeMap<&str, &crate::TensorType> =
            self.full.params.iter().map(|p| (p.name.as_str(), &p.ty)).collect();
        for r in 0..self.world {
            let names = self.owned_by(r);
            // Between GPUs, device to device (the parameters and their f32 masters).
            if backend.broadcast_on_device(&names, r, group)? {
                continue;
            }
            let specs: Vec<(&str, &crate::TensorType)> =
                names.iter().map(|n| (n.as_str(), shapes[n.as_str()])).collect();
            let got = broadcast(backend, group, r, &specs)?;
            if group.rank() != r {
                backend.write(got)?;
            }
        }
        Ok(())
    }

    /// At a checkpoint: every rank's moments to rank 0, with rank 0's own and every parameter,
    /// the whole state to save (None on the other ranks).
    pub fn gather_state(
        &self,
        backend: &mut dyn Backend,
        group: &dyn Collective,
    ) -> Result<Option<BTreeMap<String, Tensor<f32>>>, String> {
        let mut all = BTreeMap::new();
        for r in 0..self.world {
            let specs: Vec<(&str, &crate::TensorType)> =
                self.moments_of(r).into_iter().map(|s| (s.name.as_str(), &s.ty)).collect();
            let got = broadcast(backend, group, r, &specs)?;
            // (The other ranks hold one rank's share at a time, and drop it.)
            if group.rank() == 0 {
                all.extend(got);
            }
        }
        if group.rank() != 0 {
            return Ok(None);
        }
        let program = backend.program().clone();
        let held: Vec<&str> = program
            .params
            .iter()
            .map(|p| p.name.as_str())
            .chain(program.states.iter().map(|s| s.name.as_str()))
            .filter(|n| !n.starts_with("grad_acc:") && !all.contains_key(*n))
            .collect();
        all.extend(backend.read(&held)?);
        Ok(Some(all))
    }
}

/// The tensors `specs` names, read on rank `root` and sent to every rank as one bucket.
fn broadcast(
    backend: &mut dyn Backend,
    group: &dyn Collective,
    root: usize,
    specs: &[(&str, &crate::TensorType)],
) -> Result<BTreeMap<String, Tensor<f32>>, String> {
    let shape = |ty: &crate::TensorType| -> Vec<usize> {
        ty.shape.as_fixed().unwrap_or_default().iter().map(|&d| d as usize).collect()
    };
    let total: usize = specs.iter().map(|(_, ty)| elements(ty) as usize).sum();
    let mut bucket = if group.rank() == root {
        let names: Vec<&str> = specs.iter().map(|(n, _)| *n).collect();
        let mine = backend.read(&names)?;
        let mut b = Vec::with_capacity(total);
        for n in &names {
            b.extend_from_slice(mine[*n].reals().ok_or("a parameter holds integers")?);
        }
        b
    } else {
        vec![0.0; total]
    };
    group.broadcast_f32(&mut bucket, root)?;
    let mut out = BTreeMap::new();
    let mut at = 0;
    for (n, ty) in specs {
        let k = elements(ty) as usize;
        out.insert(n.to_string(), Tensor::real(shape(ty), bucket[at..at + k].to_vec()));
        at += k;
    }
    Ok(out)
}
