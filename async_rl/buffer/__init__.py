"""The buffer process: the replay buffer behind its ZeroMQ service.

    service     `BufferService`: the run's one buffer process (leases, pushes, samples, versions)
    replay      `ReplayBuffer`: the service's one facade over the two parts below
    segments    the Arrow segment files and their index: append, recover, sample by version
    admission   leases, prompt indices, the staleness budget (docs/design.md section 4)

Nothing here imports the learner, the actors or the run; the messages it answers are the wire's.
"""
