"""Data-parallel training of a fastrnn model: DistributedDataParallel (or FSDP2's fully_shard)
over gloo, so it runs on CPUs; start it with torchrun.

    torchrun --nproc_per_node=2 examples/ddp_train.py            # 2 processes on this machine
    python examples/ddp_train.py                                 # 1 process, no torchrun needed
    torchrun --nproc_per_node=2 examples/ddp_train.py --fsdp     # FSDP2: parameters sharded

Several machines: the same command on each, with its own ``--node_rank``:

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=2 --master_addr=HOST0 --master_port=29500 examples/ddp_train.py
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=2 --master_addr=HOST0 --master_port=29500 examples/ddp_train.py

The model and data are examples/forecasting.py's (a multi-layer fastrnn.LSTM over packed
variable-length windows). ``--batch`` is the *global* batch: each of the WORLD_SIZE processes
takes ``batch / WORLD_SIZE`` windows of it (DistributedSampler), and DDP averages the gradients,
so the run computes what one process computes on the whole batch: the same parameters at the
end, up to float rounding, whatever the number of processes (tests/test_distributed.py checks
this). Every process builds the same model from ``--seed`` (FSDP2, unlike DDP, does not
broadcast rank 0's weights). Rank 0 shows the progress bar and writes ``--out``: loss.png,
history.json and final.pt (the full state_dict).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import parser, progress, save, setup
from forecasting import DAY, Forecaster, make_batch, make_series
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def wrap(model: nn.Module, how: str, world: int) -> nn.Module:
    """DDP (every process holds every parameter, gradients all-reduced) or FSDP2 (parameters,
    gradients and optimizer state sharded across processes, gathered per forward/backward)."""
    if how == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        return fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return nn.parallel.DistributedDataParallel(model)


def full_state_dict(model: nn.Module) -> dict:
    """The state_dict as plain tensors (FSDP2 holds DTensor shards: gather them; every rank must
    call this)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def main(argv=None):
    p = parser("ddp_train", __doc__.split("\n\n")[0], steps=200)
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--hidden", type=int, default=64, help="hidden units per layer")
    p.add_argument("--layers", type=int, default=2, help="stacked LSTM layers")
    p.add_argument("--batch", type=int, default=64,
                   help="global batch (windows per step, all processes together)")
    p.add_argument("--windows", type=int, default=4096, help="training windows in the data set")
    p.add_argument("--max-window", type=int, default=7 * DAY, help="longest input window in hours")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"],
                   help="sgd: plain SGD, what tests/test_distributed.py compares across process counts")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.hidden, args.windows, args.max_window = 8, 16, 256, 3 * DAY

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")  # CPU collectives; over TCP between machines
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the number of processes ({world})")
    backend = setup(args, log=rank == 0)  # seeds torch: the same initial weights in every process

    gen = torch.Generator().manual_seed(args.seed)  # the same data set in every process
    x, lengths, y = make_batch(make_series(64, 60 * DAY, gen), args.windows, DAY, args.max_window, gen)
    data = TensorDataset(x, lengths, y)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    loader = DataLoader(data, batch_size=args.batch // world, sampler=sampler, drop_last=True)

    model = Forecaster(args.hidden, args.layers, DAY, args.backend)
    if distributed:
        model = wrap(model, "fsdp" if args.fsdp else "ddp", world)
    opt = (torch.optim.Adam(model.parameters(), lr=args.lr) if args.optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=args.lr))

    losses, step, epoch = [], 0, 0
    bar = progress(args.steps, f"{'fsdp' if args.fsdp else 'ddp'} x{world} ({backend})") if rank == 0 else None
    while step < args.steps:
        sampler.set_epoch(epoch)  # a new order each epoch, the same in every process
        for xb, lb, yb in loader:
            loss = F.mse_loss(model(xb, lb), yb)  # the mean over this process's share
            opt.zero_grad()
            loss.backward()  # DDP / FSDP average the gradients over the processes here
            opt.step()
            mean = loss.detach()
            if distributed:  # for the log only: the global batch's loss
                dist.all_reduce(mean)
                mean /= world
            if rank == 0:
                losses.append((step, mean.item()))
                bar.update(1)
                bar.set_postfix(mse=f"{mean.item():.4f}")
            step += 1
            if step == args.steps:
                break
        epoch += 1

    state = full_state_dict(model)  # a collective under FSDP: every rank takes part
    if rank == 0:
        bar.close()
        print(f"{world} process(es), {args.steps} steps of {args.batch} windows: final mse {losses[-1][1]:.4f}")
        # DDP wraps the model: its keys start with "module."; save the plain model's
        torch.save({k.removeprefix("module."): v for k, v in state.items()}, os.path.join(args.out, "final.pt"))
        save(args, losses, {}, f"{'FSDP2' if args.fsdp else 'DDP'} on {world} process(es), fastrnn ({backend})",
             world_size=world)
    if distributed:
        # every rank leaves together: a rank that tears gloo down while rank 0 is still saving
        # aborted at exit now and then ("terminate called without an active exception", twice in
        # the full suite, never alone)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
