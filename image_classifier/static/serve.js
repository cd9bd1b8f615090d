"use strict";
// The page of scripts/serve.py: one request per photo (the server batches the ones that arrive together),
// results drawn with textContent only, so a file name or a label can never become markup.

const runSelect = document.getElementById("run");
const results = document.getElementById("results");
const statusLine = document.getElementById("status");
const tokenBox = document.getElementById("token-box");
const tokenInput = document.getElementById("token");

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function headers() {
  const token = tokenInput.value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

async function call(path, options) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options && options.headers) } });
  let body;
  try {
    body = await response.json();
  } catch (error) {
    body = { error: "the server answered " + response.status + " without JSON" };
  }
  if (response.status === 401) tokenBox.hidden = false;
  if (!response.ok) throw new Error(body.error || "HTTP " + response.status);
  return body;
}

async function loadHealth() {
  try {
    const query = runSelect.value ? "?" + new URLSearchParams({ run: runSelect.value }) : "";
    const health = await call("health" + query);
    const chosen = runSelect.value || health.run;
    runSelect.replaceChildren();
    for (const name of health.runs) {
      const option = element("option", "", name);
      option.value = name;
      runSelect.append(option);
    }
    runSelect.value = health.runs.includes(chosen) ? chosen : health.run;
    document.getElementById("labels").textContent =
      "Categories of " + health.run + ": " + health.labels.join(", ");
    statusLine.textContent = "Ready.";
  } catch (error) {
    statusLine.textContent = error.message;
  }
}

function percent(probability) {
  return (probability * 100).toFixed(1) + "%";
}

function card(name, picture) {
  const node = element("div", "card");
  const pictures = element("div", "pictures");
  if (picture) {
    const image = element("img");
    image.src = picture;
    image.alt = name;
    pictures.append(image);
  }
  node.append(pictures, element("div", "name", name), element("div", "body", "Predicting..."));
  results.prepend(node);
  return node;
}

function show(node, record) {
  const body = node.querySelector(".body");
  body.replaceChildren();
  if (record.error) {
    node.classList.add("failed");
    body.append(element("div", "error", record.error));
    return;
  }
  if (record.known === false) {
    node.classList.add("unknown");
    body.append(element("div", "verdict", "None of these: it looks like none of the categories"));
  }
  const closest = record.known === false ? "closest: " : "";
  const label = element("div", "label", closest + record.label + " " + percent(record.probability));
  if (record.uncertain) label.append(element("span", "", " (uncertain)"));
  body.append(label);
  for (const item of record.top) {
    const row = element("div", "row");
    const bar = element("div", "bar");
    const fill = element("div");
    fill.style.width = percent(item.probability);
    bar.append(fill);
    row.append(element("span", "", item.label), bar, element("span", "", percent(item.probability)));
    body.append(row);
  }
  if (record.heatmap) {
    const image = element("img", "heatmap");
    image.src = record.heatmap;
    image.alt = "Grad-CAM heatmap of " + record.input;
    image.title = "Where the model looked (Grad-CAM)";
    node.querySelector(".pictures").append(image);
  }
}

async function predict(name, picture, body) {
  const node = card(name, picture);
  const query = new URLSearchParams({ run: runSelect.value, heatmap: "1" });
  try {
    const answer = await call("predict?" + query, { method: "POST", ...body });
    show(node, answer.predictions[0]);
    node.append(element("div", "run", "run " + answer.run.split("/").pop()));
  } catch (error) {
    show(node, { error: error.message });
  }
}

function predictFiles(files) {
  statusLine.textContent = files.length + " photo" + (files.length === 1 ? "" : "s") + " sent.";
  for (const file of files) {
    const form = new FormData();
    form.append("file", file, file.name);
    predict(file.name, URL.createObjectURL(file), { body: form });
  }
}

document.getElementById("files").addEventListener("change", (event) => {
  predictFiles([...event.target.files]);
  event.target.value = "";
});
const drop = document.getElementById("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  predictFiles([...event.dataTransfer.files].filter((file) => file.type.startsWith("image/") || !file.type));
});
document.getElementById("url-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const url = document.getElementById("url").value.trim();
  const body = JSON.stringify({ url });
  predict(url, url, { body, headers: { "Content-Type": "application/json" } });
});
runSelect.addEventListener("change", loadHealth);
tokenInput.addEventListener("change", loadHealth);
loadHealth();
