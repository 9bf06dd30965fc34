"""The Kubernetes operator: SpeechTuningStudy objects run by the engine, each trial a Job.

- ``manifests``: pure builders for the Trial and Job objects;
- ``backend``: the engine's backend on Jobs and pod logs (asyncio, one process for hundreds of trials);
- ``runner``: one study's life -- spec, storage, engine, status;
- ``handlers``: the thin kopf layer; ``python -m speechtune.k8s`` runs it.
"""
