// render_template renders an Ollama TEMPLATE with Go's own text/template,
// the way Ollama's chat endpoint does, so tests can compare it byte for byte
// with the prompt used in training.
//
// stdin: {"template": "...", "system": "...", "messages": [{"role": "...", "content": "..."}], "prompt": "..."}
// stdout: the rendered prompt (no trailing newline added).
//
// What Ollama does before executing a template (server/routes.go, template/template.go):
//   - a non-empty "prompt" (/api/generate) becomes a trailing user message;
//   - the Modelfile SYSTEM is prepended as a system message unless the
//     conversation already starts with one;
//   - consecutive messages of the same role are merged with "\n\n";
//   - .System is all system messages joined with "\n\n"; .Messages keeps
//     every message (system ones included) as items with .Role and .Content;
//   - the template is parsed with missingkey=zero and run with
//     System, Messages, Prompt (empty) and Response (empty).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
	Prompt   string    `json:"prompt"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	msgs := append([]Message{}, in.Messages...)
	if in.Prompt != "" {
		msgs = append(msgs, Message{Role: "user", Content: in.Prompt})
	}
	if in.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: in.System}}, msgs...)
	}
	var systems []string
	var merged []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if n := len(merged); n > 0 && merged[n-1].Role == m.Role && m.Role != "tool" {
			merged[n-1].Content += "\n\n" + m.Content
		} else {
			merged = append(merged, &m)
		}
	}
	if !strings.Contains(in.Template, ".Messages") {
		fmt.Fprintln(os.Stderr, "this checker only renders templates that use .Messages")
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template parse error:", err)
		os.Exit(1)
	}
	var out strings.Builder
	err = tmpl.Execute(&out, map[string]any{
		"System":   strings.Join(systems, "\n\n"),
		"Messages": merged,
		"Prompt":   "",
		"Response": "",
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "template execute error:", err)
		os.Exit(1)
	}
	fmt.Print(out.String())
}
