"""SessionAffinityRouter: a Ray Serve request router that sends each user's requests to one replica.

Ray Serve's own request-router extension (ray.serve.request_router, Ray >= 2.46): the router runs
where the deployment handle is (the ingress of `memllm serve --ray`) and picks a replica for every
request. The session key is the request's multiplexed model id (the user, set by the ingress); the
replicas report which users they hold through `@serve.multiplexed` (memllm.distributed.serve_ray), and
`memllm.distributed.affinity.owner` picks: a replica holding the user, else the rendezvous-hash
winner. The choice is strict: a busy owner makes the request wait (with Ray's backoff) rather than
go to another replica, where the user's kv memory would be locked by the owner. Requests without a
key (health, models) go to the least loaded replica. Imports ray: only Ray loads this module.
"""

from __future__ import annotations

from ray.serve.request_router import MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from memllm.distributed.affinity import owner


class SessionAffinityRouter(MultiplexMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # the owner is busy: wait, do not spin
        if not key:
            return [candidate_replicas]  # Ray probes their queues and takes the least loaded
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        holding = {rid.unique_id for rid in self._multiplexed_model_id_to_replica_ids.get(key, set())}
        return [[by_id[owner(key, sorted(by_id), holding)]]]
