"""Helper run by test_objective: 2 gloo processes x 4 samples must give one batch of 8's gradients."""

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    from test_objective import ALL_TERMS, build, grads, make_batch, views

    from llavadi.distill.selection import all_reduce_counts

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    objective, student, teacher = build(ALL_TERMS)
    _, types_s, labels, _ = make_batch(4)
    mine = slice(4 * rank, 4 * rank + 4)
    totals = all_reduce_counts(objective.count_positions(types_s[mine], labels[mine]))
    s_view, t_view, my_labels = views(student, teacher, mine)
    loss, _ = objective(s_view, t_view, my_labels, totals)
    (loss * world).backward()  # DDP averages gradients over processes: undo the 1/world
    for module in (student, objective):
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
    loss_sum = loss.detach().clone()
    dist.all_reduce(loss_sum)
    if rank == 0:
        torch.save({"loss": loss_sum.item(), "grads": grads(student, objective)}, out_file)
    # free everything before the process group goes: gloo processes otherwise abort at exit now and
    # then ("terminate called without an active exception")
    del objective, student, teacher, s_view, t_view, loss, loss_sum
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1], sys.argv[2]), nprocs=2, join=True)
