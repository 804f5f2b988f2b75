// Renders conversations with a Modelfile TEMPLATE the way Ollama's server does (ollama/template/template.go:
// Parse with missingkey=zero and its one function, json; Execute: collate, then the .Messages data map).
// Usage: ollama_render TEMPLATE_FILE < conversations.json (a list of lists of {role, content});
// prints a JSON list with {"text": ...} or {"error": ...} for each.
package main

import (
	"bytes"
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

// collate is Ollama's: consecutive messages of one role (but tool) merge, joined by a blank line; system texts
// are also collected into .System.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	raw, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(string(raw))
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(3)
	}
	var conversations [][]Message
	if err := json.NewDecoder(os.Stdin).Decode(&conversations); err != nil {
		panic(err)
	}
	out := make([]map[string]string, 0, len(conversations))
	for _, msgs := range conversations {
		system, messages := collate(msgs)
		var b bytes.Buffer
		err := tmpl.Execute(&b, map[string]any{"System": system, "Messages": messages, "Tools": nil,
			"Response": "", "Think": false, "IsThinkSet": false, "Query": "", "Document": "", "Instruction": ""})
		if err != nil {
			out = append(out, map[string]string{"error": err.Error()})
		} else {
			out = append(out, map[string]string{"text": b.String()})
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		panic(err)
	}
}
