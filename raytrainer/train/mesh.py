"""How a world of ranks divides into data-parallel replicas, pipeline stages and tensor-parallel groups.

    dims = ParallelDims(world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp, ep=cfg.parallel.ep)
    dims.dp, dims.dp_rank(rank)        which share of every global batch a rank trains on
    dims.pp_rank(rank)                 which pipeline stage(s) it holds
    dims.cp_rank(rank)                 which share of every row's sequence it holds (context parallel)
    mesh = dims.build_mesh("cpu")      a DeviceMesh named ("dp", "pp", "cp", "tp")
    dims.build_expert_mesh("cpu")      ("ep_replica", "ep"): who shares a layer's experts, who holds the same slice

Ranks are laid out with tp innermost, then cp, then pp: ranks 0..tp-1 form the first tensor-parallel group (one
node, where the links are fastest), the next tp ranks hold the next share of the sequence, the next tp x cp the
next pipeline stage, and one replica of the model is tp x cp x pp consecutive ranks; rank r is data-parallel
replica r // (tp x cp x pp). Every rank of a replica trains on
the same rows, so the global batch a step trains on depends on the data plan alone, and a run resizes in
whole replicas.

Expert parallelism divides the data-parallel ranks again: groups of ep consecutive ranks split every MoE
layer's experts between them (each rank still trains on its own rows); ranks in the same place of different
groups hold the same experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    ep: int = 1
    pp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        for key, size in (("tp", self.tp), ("ep", self.ep), ("pp", self.pp), ("cp", self.cp),
                          ("tp x parallel.pp x parallel.cp", self.replica_size)):
            if size < 1 or self.world_size % size:
                raise ValueError(f"a world of {self.world_size} ranks does not divide into groups of parallel.{key}="
                                 f"{size}; give the run a multiple of {size} workers (parallel.min_workers and "
                                 "parallel.max_workers)")

    @property
    def replica_size(self) -> int:
        """Ranks holding one copy of the model between them, all training on the same rows."""
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel replicas: how many ways every global batch is split."""
        return self.world_size // self.replica_size

    def dp_rank(self, rank: int) -> int:
        return rank // self.replica_size

    def pp_rank(self, rank: int) -> int:
        return rank // (self.tp * self.cp) % self.pp

    def cp_rank(self, rank: int) -> int:
        return rank // self.tp % self.cp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def reads_rows(self, rank: int) -> bool:
        """The one rank of a replica that reads its rows (and sends them to the others)."""
        return rank % self.replica_size == 0

    def holds_losses(self, rank: int) -> bool:
        """The one rank of a replica that speaks for its per-token losses: the first tensor-parallel and
        context-parallel rank of the last pipeline stage, where the loss is computed."""
        return self.tp_rank(rank) == 0 and self.cp_rank(rank) == 0 and self.pp_rank(rank) == self.pp - 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Every rank calls it together (it creates a process group per mesh dimension)."""
        mesh = init_device_mesh(device_type, (self.dp, self.pp, self.cp, self.tp),
                                mesh_dim_names=("dp", "pp", "cp", "tp"))
        # A reduction over both dimensions (the gradient norm of FSDP + TP parameters) then takes one collective
        # over the whole world, not one per dimension.
        mesh["dp", "tp"]._flatten("dp_tp")
        # the ranks of one replica (a pipeline's stages and their tensor-parallel groups): who shares rows
        mesh["pp", "cp", "tp"]._flatten("replica")
        return mesh

    def build_expert_mesh(self, device_type: str) -> DeviceMesh:
        """Every rank calls it together. ("ep_replica", "ep"): mesh["ep"] is a rank's expert-parallel group,
        mesh["ep_replica"] the ranks holding the same experts as it."""
        return init_device_mesh(device_type, (self.dp // self.ep, self.ep), mesh_dim_names=("ep_replica", "ep"))
