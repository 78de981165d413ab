"""Image captioning benchmark: COCO / Flickr30k Karpathy test references, k-shot interleaved
prompts (Chameleon paper: 2-shot, greedy, 30 tokens) and pycocoevalcap scoring.

- references.load_references(source, split) -> list[CaptionItem]; resolve_images(items, image_dir)
- prompts.CaptionSettings, caption_prompt(item, images, pool, settings), postprocess_caption(text)
- scoring.score_captions(references, predictions, metrics) -> CaptionScores
- commands: `chameleon-bench score-captions`
"""
