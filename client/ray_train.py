"""Build a ``SelectionSampler`` inside a Ray Train worker. Imports ray only when called.

Example: a ``train_loop_per_worker`` for a loss-based policy (``infobatch``, ``ucb``,
``epsilon_greedy``); ``train_set[i]`` returns ``(x, y, i)``. The sampler's feedback reporter
posts the per-sample losses in the background and flushes them at ``set_epoch``; its loss
weights are InfoBatch's rescaling (all 1 for other policies). A ``StatefulDataLoader``
(torchdata) checkpoint resumes mid-epoch on the same batches::

    def train_loop_per_worker(config):
        sampler = sampler_from_context(config["url"], config["job"], token=config["token"])
        loader = StatefulDataLoader(train_set, batch_size=256, sampler=sampler)
        # NOT ray.train.torch.prepare_data_loader(loader): it swaps the sampler for a
        # DistributedSampler (use add_dist_sampler=False if you need its device placement)
        start = 0
        ckpt = ray.train.get_checkpoint()
        if ckpt:                                     # resume where the checkpoint stopped
            with ckpt.as_directory() as d:
                state = torch.load(f"{d}/state.pt")
            model.load_state_dict(state["model"])
            loader.load_state_dict(state["loader"])
            sampler.feedback.load_state_dict(state["feedback"])
            start = state["epoch"]
        for epoch in range(start, sampler.num_epochs):
            sampler.set_epoch(epoch)                 # flushes epoch - 1's losses first
            for step, (x, y, idx) in enumerate(loader):
                per_sample = F.cross_entropy(model(x), y, reduction="none")
                loss = (per_sample * sampler.loss_weights(idx)).mean()
                ...                                  # backward, optimizer step
                sampler.report(idx, per_sample)      # the one line of feedback
                if step % 500 == 0:
                    sampler.feedback.flush()         # the checkpoint holds every loss sent
                    state = {"model": model.state_dict(), "loader": loader.state_dict(),
                             "feedback": sampler.feedback.state_dict(), "epoch": epoch}
                    ...                              # torch.save to a dir, ray.train.report
        sampler.feedback.close()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saelect.client.http import SelectionClient

if TYPE_CHECKING:
    from saelect.client.sampler import SelectionSampler


def sampler_from_context(
    client_or_url: SelectionClient | str, job_id: str, token: str | None = None
) -> SelectionSampler:
    """A sampler for this worker's world rank and size from ``ray.train.get_context()``.

    Parameters
    ----------
    client_or_url:
        A ``SelectionClient`` or the service URL (a client is then made with ``token``).
    job_id:
        The ready job to sample from.
    token:
        Bearer token, used only when a URL is given.
    """
    import ray.train
    from saelect.client.sampler import SelectionSampler

    ctx = ray.train.get_context()
    client = (
        client_or_url
        if isinstance(client_or_url, SelectionClient)
        else SelectionClient(client_or_url, token=token)
    )
    return SelectionSampler(
        client, job_id, rank=ctx.get_world_rank(), world_size=ctx.get_world_size()
    )
