// Answers a question about an image with a folder written by `fastvlm export onnx`, loaded the
// way the Transformers.js documentation loads FastVLM / LLaVA-style models: AutoProcessor,
// AutoModelForImageTextToText, load_image, the processor's chat template, model.generate.
// Greedy decoding; prints one JSON line: the generated token ids and their text.
//
//   node answer.mjs --model DIR --image PATH --question TEXT [--max-new-tokens N] [--dtype fp32]

import { parseArgs } from "node:util";
import { AutoModelForImageTextToText, AutoProcessor, env, load_image } from "@huggingface/transformers";

const { values: args } = parseArgs({
  options: {
    model: { type: "string" },
    image: { type: "string" },
    question: { type: "string" },
    "max-new-tokens": { type: "string", default: "16" },
    dtype: { type: "string", default: "fp32" },
  },
});
for (const name of ["model", "image", "question"]) {
  if (!args[name]) {
    console.error(`missing --${name}`);
    process.exit(2);
  }
}

// A local folder only: never reach for the hub.
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = "";

const processor = await AutoProcessor.from_pretrained(args.model);
const model = await AutoModelForImageTextToText.from_pretrained(args.model, { dtype: args.dtype, device: "cpu" });

const messages = [{ role: "user", content: [{ type: "image" }, { type: "text", text: args.question }] }];
const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });

const image = await load_image(args.image);
const inputs = await processor(image, prompt, { add_special_tokens: false });

const output = await model.generate({
  ...inputs,
  max_new_tokens: Number(args["max-new-tokens"]),
  do_sample: false,
});

const promptLength = inputs.input_ids.dims.at(-1);
const generated = output.slice(null, [promptLength, null]);
const tokenIds = generated.tolist()[0].map(Number);
const [text] = processor.batch_decode(generated, { skip_special_tokens: true });

console.log(
  JSON.stringify({
    prompt,
    input_ids: inputs.input_ids.tolist()[0].map(Number),
    pixel_values_shape: inputs.pixel_values.dims,
    token_ids: tokenIds,
    text,
  }),
);
await model.dispose();
