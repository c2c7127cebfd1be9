"""`splitserve serve --ray`: the frontend, prefill and decode workers on a Ray cluster.

- `actors.py`: the Ray actors — `ProcessActor` launches and supervises one `splitserve`
  process on its node, `EtcdActor` runs etcd on the head when no discovery is given.
- `placement.py`: what each actor asks Ray for (role resources, CPUs or a GPU) and the
  plan of processes, derived from `splitserve serve`'s own local plan.
- `launcher.py`: the driver — connect, place, wait until healthy, watch, tear down.

Ray is optional (`pip install 'splitserve[ray]'`); nothing here imports it at module level.
"""
