// llama.cpp itself (node-llama-cpp) on exported GGUF files, all in one process.
// argv[2]: a JSON file of jobs [{key, path, ids, tokens}]; for each, llama.cpp's ids of
// the detokenized prompt (special tokens parsed, no BOS added) and its greedy continuation
// of `ids`. Prints one JSON line: [{key, tokenized, generated}].
import {readFileSync} from "node:fs";
import {getLlama} from "node-llama-cpp";

const jobs = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const results = [];
for (const job of jobs) {
  const model = await llama.loadModel({modelPath: job.path});
  const text = model.detokenize(job.ids, true);
  const tokenized = Array.from(model.tokenize(text, true));
  const context = await model.createContext({contextSize: 256, batchSize: 256, threads: 2});
  const sequence = context.getSequence();
  const generated = [];
  for await (const token of sequence.evaluate(job.ids, {temperature: 0})) {
    generated.push(token);
    if (generated.length >= job.tokens) break;
  }
  await context.dispose();
  await model.dispose();
  results.push({key: job.key, tokenized, generated});
}
console.log(JSON.stringify(results));
