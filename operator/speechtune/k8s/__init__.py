"""The Kubernetes operator: SpeechTuningStudy objects run by the engine, each trial a Job.

``handlers`` is the thin kopf layer (``python -m speechtune.k8s`` runs it);
``runner`` is one study's life; ``backend`` is the engine's backend on Jobs and
pod logs; ``manifests``, ``exits``, ``status``, ``logs`` and ``retention`` are
pure. docs/operator.md has the whole picture.
"""
