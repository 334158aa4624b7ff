"""The room corpus: seeded 4-microphone kiosk rooms the capture chain was never tuned on, and its benchmark.

Development code (never imported by the product). ``kiosk bench audio --rooms N`` runs it; the modules:

==============  ==========================================================================================
``generate``    the seeded corpus: 40 s rooms for a 4-microphone array (32 mm radius) and its loudspeaker;
                ``python -m kiosk_dev.rooms.generate --rooms 80 --jobs 2`` renders and caches them
``voices``      speech in eight languages (espeak-ng), code-switched sentences (SSML), real recordings
                (alsa-utils' prompts, pyannote.audio's sample conversation)
``metrics``     labels from the rooms' parts and every figure (detection within 300 ms, false speech,
                recall, SDR, ERLE) and their aggregation
``systems``     the configured chain and the baselines (AEC3 + NS / webrtcvad, speexdsp / webrtcvad, one bare
                AEC3 call), and the registry of systems
``variants``    array front ends and chain variants (beamformer, Silero check, leak gate, direction gate,
                per-channel cancellation, tracker settings): benchmark variants only
``onset``       the Silero VAD onset check (a variant: needs onnxruntime and silero-vad, not in the product)
``bench``       per class and overall, per half, with the target checks; ``python -m kiosk_dev.rooms.bench``
``cpu``         CPU of every stage against one bare AEC3 call, same rooms, same run
==============  ==========================================================================================

Rules that keep the figures honest:

- Room ``seed`` is in the tuning half when even, the reporting half when odd; class
  ``CLASSES[(seed // 2) % 8]``. Tune on ``--split tuning``; run a variant on ``--split reporting`` only to
  confirm or refute it.
- A changed generator gets a new ``GENERATOR_VERSION`` (new cache folder). Per-room results are cached under a
  hash of the product and harness code a system depends on (and the settings it runs with); ``variants.py``
  is not hashed, so a variant's definition never changes under its name: register a changed variant under a
  new name.
- Quality figures are deterministic (seeded rooms, deterministic chain); CPU figures are timings of a shared
  machine: reported, never asserted.
"""
